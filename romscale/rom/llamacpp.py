"""llama.cpp as the anchor of the decode benchmark (issue 13): re-quantise a GGUF with llama.cpp's own
quantiser, and greedy-decode a fixed number of tokens through llama-cpp-python at batch 1.

llama-cpp-python is optional (`pip install 'romscale[bench]'`) and imported only when used.

Timing convention of `LlamaCppDecoder.greedy`: `ttft_s` runs from the start of the prefill to the
first new token (prefill + one argmax); `decode_s` covers the `new_tokens - 1` single-token steps
after it, so the decode speed is `(new_tokens - 1) / decode_s`. The last new token is sampled but
not evaluated, as in any generate loop. EOS does not stop the loop: a benchmark decodes a fixed count.

The sdist builds llama.cpp with OpenMP, whose threads spin while they wait: when another process
holds a core, 2 threads can drop to a few tok/s (1.2 tok/s at f32 against 30 with 1 thread, measured
here). Time on an idle machine, or set OMP_WAIT_POLICY=passive before llama_cpp is first imported.
Close a decoder (close() or `with`): a Llama freed at interpreter exit prints a traceback.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from romscale.errors import RomscaleError

__all__ = [
    "BENCH_EXTRA_HINT", "PRECISIONS", "LlamaCppError", "LlamaCppMissingError", "LlamaCppDecoder",
    "requantize_gguf",
]

BENCH_EXTRA_HINT = "pip install 'romscale[bench]'"

# romscale precision name -> llama.cpp's llama_ftype constant (llama_cpp.LLAMA_FTYPE_*).
PRECISIONS = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
}


class LlamaCppError(RomscaleError):
    """llama.cpp refused a file or failed (quantisation, loading, decoding)."""


class LlamaCppMissingError(LlamaCppError):
    """The optional llama-cpp-python package is not installed, or its shared library did not load."""


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as exc:  # RuntimeError: its shared library failed to load
        raise LlamaCppMissingError(
            f"the llama.cpp benchmark anchor needs the optional llama-cpp-python package ({type(exc).__name__}: {exc}): "
            f"{BENCH_EXTRA_HINT}"
        ) from exc
    return llama_cpp


def requantize_gguf(
    src: Path, dst: Path, precision: str, *, threads: int = 2, overwrite: bool = False, verbose: bool = False,
) -> Path:
    """Write `src` re-quantised to `precision` (one of PRECISIONS) at `dst` with llama.cpp's
    llama_model_quantize (allow_requantize: a quantised source is de-quantised first, so "f32" of a
    Q4_1 file holds exactly the Q4_1 weights). Crash-safe: a temporary file next to `dst`, then
    os.replace. Refuses an existing `dst` unless overwrite=True. llama.cpp's per-tensor log goes to
    stderr only with verbose=True. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    if precision not in PRECISIONS:
        raise LlamaCppError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if not src.is_file():
        raise LlamaCppError(f"GGUF source {src}: no such file")
    if dst.exists() and not overwrite:
        raise LlamaCppError(f"output {dst} already exists (pass overwrite=True to replace it)")
    if not dst.parent.is_dir():
        raise LlamaCppError(f"output {dst}: its folder {dst.parent} does not exist")
    lc = _llama_cpp()
    lc.llama_backend_init()  # what llama-quantize does first; repeated calls are harmless
    params = lc.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(lc, PRECISIONS[precision])
    params.allow_requantize = True
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    # llama-cpp-python prints llama.cpp's log lines at or above this logger's level (NOTSET until a
    # Llama(verbose=False) sets it to ERROR, for the whole process).
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        rc = lc.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), params)
        if rc != 0:
            raise LlamaCppError(f"llama_model_quantize {src} -> {precision} failed (return code {rc})")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the model private to its writer
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        log.setLevel(level)
    return dst


def _probe_child(gguf: str, threads: int) -> None:
    LlamaCppDecoder(Path(gguf), threads=threads, n_ctx=64, probe=False).greedy([1, 2, 3, 4], 2)


def probe_decode(gguf: Path, threads: int = 2, timeout_s: float = 300.0, target=_probe_child) -> None:
    """Load `gguf` and decode two tokens in a child process, so that a llama.cpp kernel that faults
    on this CPU ends in a LlamaCppError instead of killing this process without a word. Seen here:
    llama-cpp-python 0.3.36 built with -march=native on a VM whose CPU lists AMX segfaults in its
    q8_0 (AMX int8) matmuls, while f32 runs. Other failures (a file it cannot load) are left to the
    caller's own load, which reports them. `target(gguf, threads)`: the child's work (a picklable
    function; tests pass one that crashes)."""
    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads or llama.cpp state
    child = ctx.Process(target=target, args=(str(gguf), threads), daemon=True)
    child.start()
    child.join(timeout_s)
    if child.exitcode is None:
        child.kill()
        raise LlamaCppError(f"GGUF file {gguf}: llama.cpp did not decode two tokens in {timeout_s:.0f} s")
    if child.exitcode < 0:
        sig = signal.Signals(-child.exitcode).name
        raise LlamaCppError(
            f"GGUF file {gguf}: llama.cpp crashed ({sig}) decoding it on this CPU; rebuild llama-cpp-python "
            "without the faulting kernels (on CPUs with AMX: CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 "
            "-mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" pip install --no-cache-dir "
            "--force-reinstall llama-cpp-python) "
            "or leave the llama.cpp arm out")


class LlamaCppDecoder:
    """A GGUF model in llama.cpp, batch 1, for greedy decoding of a fixed number of tokens.
    `probe`: decode two tokens in a child process first (probe_decode)."""

    def __init__(self, gguf: Path, threads: int = 2, n_ctx: int = 512, probe: bool = True) -> None:
        gguf = Path(gguf)
        if not gguf.is_file():
            raise LlamaCppError(f"GGUF file {gguf}: no such file")
        lc = _llama_cpp()
        if probe:
            probe_decode(gguf, threads)
        try:
            self.llama = lc.Llama(
                model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                verbose=False, logits_all=False,
            )
        except ValueError as exc:  # what llama-cpp-python raises when llama.cpp cannot load the file
            raise LlamaCppError(f"GGUF file {gguf}: llama.cpp could not load it ({exc})") from exc
        self._lc = lc
        # llama.cpp rounds the context up (to a multiple of 256) but llama-cpp-python's token buffer
        # holds exactly the n_ctx asked for: the smaller of the two is the limit.
        self.n_ctx = min(self.llama.n_ctx(), len(self.llama.input_ids))
        self.n_vocab = self.llama.n_vocab()

    def prefill(self, ids: Sequence[int]) -> None:
        """Forget the previous sequence and evaluate `ids` from position 0."""
        if not ids:
            raise LlamaCppError("prefill needs at least one token")
        self.llama.reset()
        self._eval(list(ids))

    def step(self, token: int) -> None:
        """Evaluate one more token after the current sequence."""
        self._eval([int(token)])

    def _eval(self, ids: list[int]) -> None:
        if self.llama.n_tokens + len(ids) > self.n_ctx:
            raise LlamaCppError(f"{self.llama.n_tokens} + {len(ids)} tokens exceed the context of {self.n_ctx} (n_ctx)")
        try:
            self.llama.eval(ids)
        except RuntimeError as exc:
            raise LlamaCppError(f"llama.cpp decode failed: {exc}") from exc

    def last_logits(self):
        """The logits after the last evaluated token, a numpy view of llama.cpp's buffer (valid
        until the next eval). Read from llama_get_logits_ith(ctx, -1): with logits_all=False,
        llama-cpp-python 0.3.x no longer copies logits into `Llama.scores`."""
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self.llama.ctx, -1)
        if not ptr:
            raise LlamaCppError("llama.cpp returned no logits (nothing evaluated yet?)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def argmax(self) -> int:
        return int(self.last_logits().argmax())

    def greedy(self, ids: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Greedy-decode `new_tokens` tokens after `ids` (EOS does not stop it). Returns
        (tokens, ttft_s, decode_s): see the module docstring for what each time covers."""
        if new_tokens < 1:
            raise LlamaCppError(f"new_tokens {new_tokens}: expected >= 1")
        if len(ids) + new_tokens - 1 > self.n_ctx:
            raise LlamaCppError(f"{len(ids)} prompt + {new_tokens} new tokens exceed the context of {self.n_ctx} (n_ctx)")
        start = time.perf_counter()
        self.prefill(ids)
        out = [self.argmax()]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.step(out[-1])
            out.append(self.argmax())
        end = time.perf_counter()
        return out, first - start, end - first

    def close(self) -> None:
        llama = getattr(self, "llama", None)
        if llama is not None:
            llama.close()
            self.llama = None

    def __enter__(self) -> LlamaCppDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
