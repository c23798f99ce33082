"""The ecif auditing app at Streamlit's conventional place: ``app/streamlit_app.py``.

    streamlit run app/streamlit_app.py -- AUDIT_FOLDER

A thin file over the package: it runs ``ecif/app/main.py``, the same entry script that
``ecif app`` serves, so both open the same pages (overview, suspects, pair detail,
trace-back). The audit folder is ``$ECIF_AUDIT`` when set, else the first argument after
``--``, else ``./ecif-demo``; the sidebar can change it. ``ecif app`` also binds the server
to 127.0.0.1 and turns off usage statistics; run from the repository root,
``.streamlit/config.toml`` does the same here.
"""

import runpy

from ecif.app import APP_SCRIPT

# run_path, not import: Streamlit re-executes this file on every interaction, and an import
# would run the package script only the first time
runpy.run_path(str(APP_SCRIPT), run_name="__main__")
