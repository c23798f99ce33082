"""Page scripts of the app (run by Streamlit, not imported)."""
