"""Find what a config points at: the Environment, its dataset, the policy's sampler.

Shared by ``rlft train``, ``eval``, ``validate`` and ``serve`` so that one config drives them
all. ``env = "recipes/search/env.py"`` imports that file and takes its ``env`` attribute (or
the only Environment in it); ``"pkg.module:my_env"`` names module and attribute. The module's
``dataset`` attribute (a path, a list of rows or a Dataset) is the default data. Left out:
the training loop and anything that writes.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from rlft.config import ConfigError, TrainConfig
from rlft.data import Dataset, load_dataset
from rlft.env import Environment
from rlft.errors import EnvironmentLoadError


def _user_frames(e: BaseException) -> str:
    """The traceback lines of an import failure that are in the user's own files (not rlft's,
    not the standard library's): where to look, without the machinery around it."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "importlib" not in f.filename and "/rlft/" not in f.filename]
    return "".join(traceback.format_list(frames)).rstrip()


def load_environment(spec: str) -> tuple[Environment, Any, str]:
    """(environment, its module, the module's source text for the run's snapshot)."""
    if not spec:
        raise ConfigError("no environment: set `env` to a file (env.py) or a module path (pkg.module:attr)")
    path_part, _, attr = spec.partition(":") if not (len(spec) > 1 and spec[1] == ":") else (spec, "", "")
    path = Path(path_part)
    if path.suffix == ".py" or path.exists():
        if not path.exists():
            raise ConfigError(f"environment file {path} does not exist")
        name = f"rlft_env_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent.resolve()))  # sibling imports (helpers next to env.py)
        try:
            mod_spec.loader.exec_module(module)
        except SyntaxError as e:
            raise EnvironmentLoadError(f"environment file {e.filename or path}, line {e.lineno}: {e.msg}\n"
                                       f"    {(e.text or '').strip()}") from e
        except Exception as e:
            raise EnvironmentLoadError(f"environment file {path} failed to import: {type(e).__name__}: {e}\n"
                                       f"{_user_frames(e)}") from e
        finally:
            sys.path.remove(str(path.parent.resolve()))
        source = path.read_text()
    else:
        module = importlib.import_module(path_part)
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            source = ""
    if attr:
        if not hasattr(module, attr):
            raise ConfigError(f"{spec}: module has no attribute {attr!r}")
        env = getattr(module, attr)
    elif isinstance(getattr(module, "env", None), Environment):
        env = module.env
    else:
        found = [v for v in vars(module).values() if isinstance(v, Environment)]
        if len(found) != 1:
            raise ConfigError(f"{spec}: define `env = Environment(...)` (found {len(found)} environments)")
        env = found[0]
    if callable(env) and not isinstance(env, Environment):
        env = env()
    if not isinstance(env, Environment):
        raise ConfigError(f"{spec}: {attr or 'env'} is a {type(env).__name__}, not an Environment")
    return env, module, source


def load_data(source: Any = None, *, module: Any = None, eval_data: str = "", eval_size: int = 0,
              eval_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train split, eval split). ``source``: a file, rows or a dataset; None = the environment
    module's ``dataset`` (a relative path there is relative to the module's file). The eval split
    is ``eval_data`` when given, else the rows' own ``split`` field, else ``eval_size`` rows or an
    ``eval_fraction`` of them, drawn with ``seed``."""
    source = source if source is not None else getattr(module, "dataset", None)
    if source is None:
        raise ConfigError("no dataset: set `data` to a file, or define `dataset` in the environment module")
    if isinstance(source, (str, Path)) and module is not None and not Path(source).is_absolute():
        mod_file = getattr(module, "__file__", None)
        if mod_file and not Path(source).exists() and (Path(mod_file).parent / source).exists():
            source = Path(mod_file).parent / source
    data = load_dataset(source)
    if eval_data:
        return data, load_dataset(eval_data)
    if any(ex.get("split") is not None for ex in data.examples):  # the rows decide
        return data.split(seed=seed)
    if eval_size > 0:
        return data.split(eval_size=eval_size, seed=seed)
    if eval_fraction <= 0:
        return data, Dataset([], name="<no eval>")
    return data.split(eval_fraction=eval_fraction, seed=seed)


def load_splits(cfg: TrainConfig, module: Any = None, dataset: Any = None) -> tuple[Dataset, Dataset]:
    """:func:`load_data` with a run config's data keys (``data``, ``eval_data``, ``eval_size``,
    ``eval_fraction``, ``seed``); ``dataset`` (an object) wins over ``data``."""
    return load_data(dataset if dataset is not None else (cfg.data or None), module=module, eval_data=cfg.eval_data,
                     eval_size=cfg.eval_size, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
