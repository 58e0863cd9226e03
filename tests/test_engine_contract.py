"""The engine contract (rlft.engines.base): every trainable engine declares its weight format and
takes new weights through the one ``sync_weights(update: WeightUpdate)``; WeightSync pushes the
form the engine declares; nothing in rlft probes an engine with hasattr/getattr; make_engine
picks the format a run's options call for."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlft.engines.base import WeightFormat, WeightUpdate
from rlft.training.sync import WeightSync

RLFT = Path(__file__).resolve().parents[1] / "rlft"


def _sources():
    for path in sorted(RLFT.rglob("*.py")):
        yield path.relative_to(RLFT.parent).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _declares_weight_format(cls: ast.ClassDef) -> bool:
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef) and node.name == "weight_format":  # a property
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for t in targets:
            if (isinstance(t, ast.Name) and t.id == "weight_format") or (
                    isinstance(t, ast.Attribute) and t.attr == "weight_format"):
                return True
    return False


def test_every_sync_weights_in_rlft_has_the_one_signature_and_its_class_declares_a_weight_format():
    found = []
    for where, tree in _sources():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "sync_weights":
                    args = fn.args
                    shape = ([a.arg for a in args.args], ast.unparse(args.args[-1].annotation or ast.Constant(None)),
                             args.vararg, args.kwarg, args.kwonlyargs, args.defaults)
                    assert shape == (["self", "update"], "WeightUpdate", None, None, [], []), \
                        f"{where}: {cls.name}.sync_weights must be (self, update: WeightUpdate)"
                    assert _declares_weight_format(cls), f"{where}: {cls.name} has no weight_format"
                    found.append(cls.name)
    assert {"TrainableEngine", "HFEngine", "RemoteEngine", "VLLMEngine"} <= set(found), found


def test_the_engines_take_a_weight_update_and_declare_their_format_at_runtime():
    from rlft.engines.hf import HFEngine
    from rlft.engines.remote import RemoteEngine
    from rlft.engines.vllm import VLLMEngine

    for cls in (HFEngine, RemoteEngine, VLLMEngine):
        params = list(inspect.signature(cls.sync_weights).parameters.values())
        assert [p.name for p in params] == ["self", "update"] and params[1].default is inspect.Parameter.empty
    assert RemoteEngine.weight_format is WeightFormat.ADAPTER
    lora, full = (SimpleNamespace(lora=flag) for flag in (True, False))
    assert VLLMEngine.weight_format.fget(lora) is WeightFormat.ADAPTER
    assert VLLMEngine.weight_format.fget(full) is WeightFormat.MODULE


def _probes_an_engine(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
            and node.args):
        return False
    target = node.args[0]
    return (isinstance(target, ast.Name) and "engine" in target.id) or (
        isinstance(target, ast.Attribute) and "engine" in target.attr)


def test_nothing_in_rlft_probes_an_engine_with_hasattr_or_getattr():
    probes = {(where, ast.unparse(n)) for where, tree in _sources() for n in ast.walk(tree) if _probes_an_engine(n)}
    assert probes == set()


# -- WeightSync pushes the form the engine declares -------------------------------------------------

class FakeEngine:
    """Records the updates it is given; generating is an error (these tests never probe)."""

    def __init__(self, weight_format: WeightFormat, policy_version: int = 0):
        self.weight_format, self.policy_version = weight_format, policy_version
        self.updates: list[WeightUpdate] = []

    async def generate(self, prompt_ids, params):
        raise AssertionError("not probed")

    def paused(self):
        return contextlib.nullcontext()

    def clear_prefix_cache(self) -> None:
        pass

    def sync_weights(self, update: WeightUpdate) -> None:
        self.updates.append(update)
        self.policy_version = update.version

    def close(self) -> None:
        pass


def _policy(is_lora: bool = True):
    def save(path):  # what Policy.save leaves: the adapter's files in a directory
        Path(path).mkdir(parents=True)
        (Path(path) / "adapter_model.safetensors").write_text("weights")

    return SimpleNamespace(model=object(), is_lora=is_lora, save=save)


def _sync(engine, tmp_path, policy=None, check=False):
    renderer = SimpleNamespace(render_prompt=lambda messages: [1, 2, 3])
    return WeightSync(policy or _policy(), engine, renderer, tmp_path, asyncio.new_event_loop(), check=check)


def test_weight_sync_pushes_a_saved_adapter_to_an_adapter_engine_and_keeps_the_two_newest(tmp_path):
    engine = FakeEngine(WeightFormat.ADAPTER)
    sync = _sync(engine, tmp_path)
    for version in (1, 2, 3):
        sync.after_update(version)
    assert [(u.version, u.model) for u in engine.updates] == [(1, None), (2, None), (3, None)]
    assert [Path(u.adapter_dir).name for u in engine.updates] == ["v1", "v2", "v3"]
    assert (Path(engine.updates[-1].adapter_dir) / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["v2", "v3"]


def test_weight_sync_pushes_the_trainers_module_to_a_module_engine_and_saves_nothing(tmp_path):
    policy = _policy(is_lora=False)
    engine = FakeEngine(WeightFormat.MODULE)
    _sync(engine, tmp_path, policy).after_update(1)
    (update,) = engine.updates
    assert (update.version, update.adapter_dir) == (1, None) and update.model is policy.model
    assert not (tmp_path / "sync").exists()


def test_weight_sync_only_moves_a_shared_engines_version_and_never_probes_it(tmp_path):
    engine = FakeEngine(WeightFormat.SHARED)
    sync = _sync(engine, tmp_path, check=True)
    assert sync.start(0) == {} and engine.updates == []  # at version 0 already: nothing pushed
    assert sync.after_update(1) == {}  # checking enabled, yet not probed (FakeEngine.generate would raise)
    assert [u.version for u in engine.updates] == [1] and engine.policy_version == 1


def test_weight_sync_start_pushes_only_when_the_engine_serves_another_version(tmp_path):
    engine = FakeEngine(WeightFormat.MODULE, policy_version=4)
    sync = _sync(engine, tmp_path, _policy(is_lora=False))
    sync.start(4)
    assert engine.updates == []
    sync.start(6)  # a resume from step 6
    assert [u.version for u in engine.updates] == [6]


def test_an_adapter_engine_needs_a_lora_policy(tmp_path):
    with pytest.raises(ValueError, match="FakeEngine takes new weights as LoRA adapters only"):
        _sync(FakeEngine(WeightFormat.ADAPTER), tmp_path, _policy(is_lora=False))


# -- make_engine: the format follows the run's options ----------------------------------------------

def test_make_engine_shares_the_trainers_module_only_when_sampling_and_training_take_turns_in_one_dtype(tmp_path):
    from rlft.config import load_config
    from rlft.engines.factory import EngineOptions, engine_options, make_engine
    from rlft.policy import LoraSpec, load_policy
    from rlft.testing.models import save_tiny_model

    path = save_tiny_model(tmp_path / "m")
    full = load_policy(path, dtype="float32")
    lora = load_policy(path, dtype="float32", lora=LoraSpec(rank=4))
    opts = engine_options(load_config(overrides={"model": path, "dtype": "float32"}).resolved())
    assert (opts.kind, opts.overlap, opts.bf16, opts.sharded, opts.served_model) == ("hf", False, False, False, path)
    cases = [(opts, full, WeightFormat.SHARED), (opts, lora, WeightFormat.MODULE),  # LoRA: a merged copy
             (EngineOptions("hf", 8, overlap=True), full, WeightFormat.MODULE),  # samples while the trainer steps
             (EngineOptions("hf", 8, bf16=True), full, WeightFormat.MODULE)]  # a bf16 copy of fp32 weights
    for options, policy, want in cases:
        engine = make_engine(options, policy)
        try:
            assert engine.weight_format is want, (options, policy.is_lora)
            assert (engine.model is policy.model) == (want is WeightFormat.SHARED)
        finally:
            engine.close()
    with pytest.raises(NotImplementedError, match="use hf, openai, vllm"):
        make_engine(EngineOptions("tgi", 8), full)
