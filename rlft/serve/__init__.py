"""``rlft serve``: an OpenAI-compatible server for a base model and a run's checkpoints.

- ``app.py``: the HTTP app (routes, auth, error mapping); ``server.py``: running it (uvicorn, the
  background server used by tests and the console, the CLI options);
- ``requests.py``: the request bodies and how each becomes prompt ids and sampling params;
  ``messages.py``: chat messages; ``structured.py``: tools, ``tool_choice`` and
  ``response_format`` (the grammars of constrained decoding);
- ``replies.py``: sampled tokens -> choice fields; ``streaming.py``: streamed chat completions;
  ``errors.py``: errors in OpenAI's shape;
- ``models.py``: model names, loading, the LRU; ``shared_base.py``: bases loaded once, adapters as
  views of them; ``lora_view.py``: a plain LoRA put on such a view without peft.
"""

from rlft.serve.app import BackgroundServer, add_serve_arguments, create_app, run_server, serve_main

__all__ = ["BackgroundServer", "add_serve_arguments", "create_app", "run_server", "serve_main"]
