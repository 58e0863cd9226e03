"""``rlft serve``: an OpenAI-compatible server for a base model and a run's checkpoints.

- ``app.py``: the HTTP app (chat and completions, streaming, adapters by name), the background
  server used by tests and the console;
- ``requests.py``: the request bodies and how each becomes prompt ids and sampling params;
- ``models.py``: model names, loading and the request/response mapping.
"""

from rlft.serve.app import BackgroundServer, add_serve_arguments, create_app, run_server, serve_main

__all__ = ["BackgroundServer", "add_serve_arguments", "create_app", "run_server", "serve_main"]
