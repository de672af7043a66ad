"""``erasekit serve``: a web app to erase, compare, attack and export in the browser (issue 18).

:mod:`erasekit.serve.core` holds the app's state and jobs (plain Python, unit-tested);
:mod:`erasekit.serve.app` lays them out in Gradio (the optional ``ui`` extra). See docs/webapp.md.
"""
