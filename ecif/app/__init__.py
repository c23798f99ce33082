"""The Streamlit auditing app (`ecif app`): overview, suspects, pair detail, trace-back.

``support`` and ``detail`` hold the logic (no Streamlit), ``state`` the caches, ``main.py``
the entry script and ``views/`` one script per page.
"""

from pathlib import Path

APP_SCRIPT = Path(__file__).with_name("main.py")
