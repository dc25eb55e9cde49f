"""The top-level API: every exported name resolves, and `import romscale` stays cheap (no torch)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import romscale

EXPECTED = {
    "MekiConfig", "attach_meki", "detach_meki", "fold", "save_meki", "load_meki", "parameter_report",
    "export_bundle", "load_bundle", "verify_bundle",
    "AdapterBank", "merge_adapters", "MergeOptions", "fit_hydraopt", "HydraOptConfig", "HydraBundle",
    "read_peft_adapter", "write_peft_adapter",
    "load_causal_lm", "RomscaleError", "__version__",
    "TaskBank", "write_task_bank", "LoraTrainConfig", "train_task_adapters", "load_library", "AdapterSlot",
    "TaskEvaluator", "ClusterProblem", "get_clusterer", "D2CConfig", "run_d2c", "AdapterBenchmark",
    "AdapterBenchmarkConfig", "TrainConfig", "get_memory", "save_memories", "load_memories",
    "export_native", "OrtDecoder",
}


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_all_lists_the_public_api():
    assert set(romscale.__all__) == EXPECTED
    assert romscale.__all__ == sorted(romscale.__all__)
    assert set(romscale.__all__) == set(romscale._EXPORTS) | {"RomscaleError", "__version__"}
    assert set(romscale.__all__) <= set(dir(romscale))


@pytest.mark.parametrize("name", sorted(EXPECTED - {"__version__"}))
def test_every_name_resolves_to_a_callable_or_class(name):
    obj = getattr(romscale, name)
    assert inspect.isclass(obj) or callable(obj), name
    assert obj.__name__ == name
    assert getattr(romscale, name) is obj  # cached


def test_version_is_the_package_version():
    from importlib.metadata import version

    assert romscale.__version__ == version("romscale")


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        romscale.nope  # noqa: B018
    assert not hasattr(romscale, "nope")


def test_import_romscale_does_not_import_torch():
    _run("import romscale, sys; assert 'torch' not in sys.modules, 'torch imported'")


def test_cheap_modules_do_not_import_torch(tmp_path):
    """What the CLI imports before any real work: the model-path check and the machine line module."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"")
    _run(
        "import sys, romscale, romscale.models, romscale.utils.machine, romscale.errors\n"
        f"src = romscale.models.resolve_model_source({str(folder)!r})\n"
        "assert src.kind == 'hf'\n"
        "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )


def test_machine_line_names_torch():
    from romscale.utils.machine import machine_line

    line = machine_line()
    from romscale.utils.machine import cpu_model

    assert "torch" in line and "cores" in line and cpu_model() in line and cpu_model()


def test_type_checking_imports_match_the_runtime_names():
    """The `if TYPE_CHECKING:` block (what IDEs see) names the same objects __getattr__ returns."""
    import ast

    tree = ast.parse(inspect.getsource(romscale))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    seen: dict = {}
    exec(compile(ast.Module(body=block.body, type_ignores=[]), "<TYPE_CHECKING>", "exec"), seen)
    typed = {k: v for k, v in seen.items() if not k.startswith("__")}
    assert set(typed) == EXPECTED - {"RomscaleError", "__version__"}
    for name, obj in typed.items():
        assert getattr(romscale, name) is obj, name
