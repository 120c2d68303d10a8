"""The device a model trains on and the numeric precision it trains in.

TensorFlow is the backend the project installs and serves with; GPU machines with JAX and no
TensorFlow train under ``KERAS_BACKEND=jax``. Only the pieces here (and the input pipeline
in :mod:`malaria.model.trainer`) differ by backend.

Precision: ``mixed_bfloat16`` pays only where the hardware runs bfloat16 natively. Two kinds
of CPU were measured training ``cellnet``: with AVX-512 BF16 (and AMX) bf16 was ~1.5x faster
than float32; with AVX2 only, oneDNN emulates bf16 and it was ~6x *slower*. So a CPU
without native bf16 always trains in float32, and one with it trains in bf16 unless a few
timed steps of the very model show bf16 clearly slower, or the backend refuses it
(:func:`resolve_precision`). The probe only vetoes: the flags decide, so the choice does
not flip with the load of a shared machine.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from malaria.model.architectures import build_model

if TYPE_CHECKING:
    from malaria.model.config import TrainConfig

# The CPU flags that decide the precision, recorded with every benchmark and training run.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# Native bfloat16 arithmetic: AVX512_BF16 dot products, or AMX tiles with bf16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# On a CPU with native bf16, the probe falls back to float32 only when bf16's fastest step
# is this much slower than float32's: far outside timing noise (bf16 was measured 1.5x
# faster where it is native, 6x slower where it is emulated).
BF16_MAX_SLOWDOWN = 1.25
PROBE_STEPS = 6  # timed steps of each precision, interleaved
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def backend() -> str:
    return keras.backend.backend()


def gpus() -> list[Any]:
    """The GPUs the Keras backend in use can train on (TensorFlow or JAX)."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.config.list_physical_devices("GPU")
    if name == "jax":
        import jax

        return [d for d in jax.devices() if d.platform == "gpu"]
    return []


# -------------------------------------------------------------------------------- the CPU


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` text (x86 Linux)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty off Linux or when ``/proc/cpuinfo`` is unreadable)."""
    if platform.system() != "Linux":
        return frozenset()
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def reported_cpu_flags(flags: Collection[str] | None = None) -> dict[str, bool]:
    """Which of the flags that decide the precision the CPU has, for a JSON record."""
    present = cpu_flags() if flags is None else flags
    return {name: name in present for name in REPORTED_CPU_FLAGS}


def describe_precision(policy: str, flags: Collection[str] | None = None) -> str:
    """One line for a log: the policy chosen and the CPU flags it was chosen on."""
    shown = " ".join(f"{name}={'yes' if there else 'no'}"
                     for name, there in reported_cpu_flags(flags).items())
    return f"precision {policy} ({backend()}; cpu {shown})"


def cpu_has_bf16(flags: Collection[str] | None = None) -> bool:
    """AVX512_BF16 or AMX-BF16: oneDNN then runs bfloat16 convolutions natively."""
    present = cpu_flags() if flags is None else flags
    return bool(NATIVE_BF16_FLAGS & set(present))


def gpu_has_bf16(device: Any) -> bool:
    """Compute capability 8.0 or later (Ampere, Hopper, ...): bfloat16 tensor cores."""
    capability: Any = getattr(device, "compute_capability", None)  # a JAX device: "9.0"
    if capability is None and backend() == "tensorflow":
        import tensorflow as tf

        capability = tf.config.experimental.get_device_details(device).get(
            "compute_capability")  # (9, 0)
    if capability is None:
        return False
    major = int(str(capability).split(".")[0]) if isinstance(capability, str) else capability[0]
    return int(major) >= 8


# ------------------------------------------------------------------------ the choice


def choose_on_native_bf16(fp32_seconds: Collection[float],
                          bf16_seconds: Collection[float]) -> str:
    """bf16, unless its probe steps failed or its fastest step is slower than float32's
    by more than :data:`BF16_MAX_SLOWDOWN`.

    The minimum of each is the least disturbed estimate of a step's cost: on a shared
    machine other load comes and goes, and it only ever adds time."""
    if not fp32_seconds or not bf16_seconds:
        return "float32"
    clearly_slower = min(bf16_seconds) > min(fp32_seconds) * BF16_MAX_SLOWDOWN
    return "float32" if clearly_slower else "mixed_bfloat16"


StepTimer = Callable[[], float]  # runs one training step, returns its seconds
Probe = Callable[["TrainConfig", str], StepTimer]


def probe_step(config: TrainConfig, policy: str) -> StepTimer:
    """A function that times one training step of this architecture under ``policy``."""
    size = config.resolved_input_size()
    with dtype_policy(policy):
        model = build_model(config.arch, size, augment=config.augment, seed=config.seed)
    model.compile(keras.optimizers.AdamW(1e-3), keras.losses.BinaryCrossentropy())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (config.batch_size, 1)).astype(np.float32)
    for _ in range(2):  # tracing and oneDNN primitive creation
        model.train_on_batch(x, y)

    def step() -> float:
        start = time.perf_counter()
        model.train_on_batch(x, y)
        return time.perf_counter() - start

    return step


_POLICY_CACHE: dict[tuple[str, int, int], str] = {}


def resolve_precision(config: TrainConfig, *, flags: Collection[str] | None = None,
                      devices: list[Any] | None = None, probe: Probe = probe_step,
                      probe_steps: int = PROBE_STEPS) -> str:
    """The global dtype policy to train with.

    An explicit ``config.mixed_precision`` is used as given. ``auto``: on a GPU,
    ``mixed_bfloat16`` where its tensor cores take bfloat16 (compute capability 8.0 and up:
    float32's range, so no loss scaling) and ``mixed_float16`` on older ones; on a CPU
    without native bfloat16 (AVX2 only, or AVX-512 without BF16) ``float32`` with no probe;
    on one with it, ``mixed_bfloat16`` unless interleaved timed training steps of this very
    architecture, input size and batch show it clearly slower than float32, or fail (oneDNN
    built or limited without bf16 kernels for a layer). ``flags``, ``devices`` and ``probe`` are for tests.
    """
    if config.mixed_precision != "auto":
        return config.mixed_precision
    found = gpus() if devices is None else devices
    if found:
        return "mixed_bfloat16" if all(gpu_has_bf16(g) for g in found) else "mixed_float16"
    if not cpu_has_bf16(flags):
        return "float32"
    key = (config.arch, config.resolved_input_size(), config.batch_size)
    if key not in _POLICY_CACHE:
        fp32 = probe(config, "float32")
        fp32_times: list[float] = []
        bf16_times: list[float] = []
        try:
            bf16 = probe(config, "mixed_bfloat16")
            for _ in range(probe_steps):
                fp32_times.append(fp32())
                bf16_times.append(bf16())
        except Exception:  # any backend error here means "no bf16 on this CPU"
            # oneDNN built or limited (ONEDNN_MAX_CPU_ISA) without bf16 kernels for this
            # layer refuses the primitive: bf16 cannot train here at all.
            bf16_times = []
        _POLICY_CACHE[key] = choose_on_native_bf16(fp32_times, bf16_times)
    return _POLICY_CACHE[key]


class dtype_policy:
    """Set the global Keras dtype policy while building, then put the old one back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.previous: Any = None

    def __enter__(self) -> None:
        self.previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.name)

    def __exit__(self, *exc: object) -> None:
        keras.mixed_precision.set_global_policy(self.previous)


# ---------------------------------------------------------------------- several devices


class _OneDevice:
    """The part of ``tf.distribute.Strategy`` that ``train`` uses, for other backends."""

    num_replicas_in_sync = 1

    def scope(self) -> AbstractContextManager[None]:
        return nullcontext()


def distribution_strategy() -> Any:
    """MirroredStrategy across several visible GPUs; the default strategy otherwise.
    Other Keras backends train on one device."""
    if backend() != "tensorflow":
        return _OneDevice()
    import tensorflow as tf

    if len(gpus()) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
