"""``init_from``: a run starts from another run's weights (an SFT warm-up, or an earlier RL run)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rlft import Environment  # noqa: E402

ROWS = [{"prompt": f"write {i}"} for i in range(12)]


def _env():
    return Environment(rewards=[lambda ro: len(set(ro.completion)) / 16], max_tokens=8)


def _weights(path):
    from safetensors.torch import load_file

    (f,) = sorted(path.glob("*.safetensors"))
    return load_file(f)


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_started_from_another_run_begins_with_its_weights(tiny_model_dir, tmp_path, lora):
    from rlft.store import RunStore
    from rlft.training.checkpoint import latest_checkpoint
    from rlft.training.loop import train

    common = dict(model=tiny_model_dir, dtype="float32", lora=lora, lora_rank=4, batch_size=2, group_size=2,
                  eval_fraction=0.0, validate=False, progress=False, runs_dir=str(tmp_path / "runs"))
    source = train(**common, steps=2, learning_rate=5e-3, run_name="source", environment=_env(), dataset=ROWS)
    # learning rate 0: the new run's weights stay exactly what it started from
    follower = train(**common, steps=1, learning_rate=0.0, init_from="source", run_name="follower",
                     environment=_env(), dataset=ROWS)
    store = RunStore(tmp_path / "runs", readonly=True)
    a = _weights(latest_checkpoint(store.run_dir(source))[1])
    b = _weights(latest_checkpoint(store.run_dir(follower))[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [entry["message"] for entry in store.logs(follower)]
    assert any(m.startswith("weights from run ") and "step 2" in m for m in logs), logs
    # and the source's weights differ from the untouched model's: the test would see a no-op
    fresh = train(**common, steps=1, learning_rate=0.0, run_name="fresh", environment=_env(), dataset=ROWS)
    c = _weights(latest_checkpoint(store.run_dir(fresh))[1])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_init_from_an_unknown_run_is_a_config_error(tiny_model_dir, tmp_path):
    from rlft.config import ConfigError
    from rlft.training.loop import train

    with pytest.raises(ConfigError, match="init_from = 'nope'"):
        train(model=tiny_model_dir, dtype="float32", lora=False, batch_size=2, group_size=2, eval_fraction=0.0,
              validate=False, progress=False, runs_dir=str(tmp_path / "runs"), steps=1, init_from="nope",
              environment=_env(), dataset=ROWS)
