"""The core install is light: importing ted_stream pulls none of the extras.

mosaicml-streaming itself requires (and imports) transformers and matplotlib, so those come with
any install; DeepSpeed, webdataset, accelerate and gguf do not."""
import importlib.metadata
import subprocess
import sys

EXTRAS = ("deepspeed", "webdataset", "gguf")


def test_core_requirements_name_no_extra():
    core = [r for r in importlib.metadata.requires("ted_stream") if "extra ==" not in r]
    names = {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower() for r in core}
    assert names == {"torch", "numpy", "zstandard", "mosaicml-streaming", "tqdm"}


def test_importing_the_library_imports_no_extra():
    code = ("import sys, ted_stream, ted_stream.scorer, ted_stream.policy, ted_stream.cli; "
            "ted_stream.TEDWebDataset; ted_stream.TEDProtocol; "  # their paths need no webdataset or deepspeed
            f"print([m for m in {EXTRAS!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_ted_stream_loads_neither_torch_nor_streaming():
    # Launchers check their config through ted_stream before loading torch (seconds).
    code = "import sys, ted_stream; print([m for m in ('torch', 'streaming') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
