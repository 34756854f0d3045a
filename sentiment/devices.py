"""Which device to run on and what it computes natively: shared by training and the `Predictor`.

`pick_device` turns a `--device` value into a device that is known to be here; `cpu_has_bf16` and
`gpu_has_bf16` say whether bf16 arithmetic runs in hardware, where it is fast, or is emulated,
where it is slower than fp32 (PyTorch's own `is_bf16_supported()` counts emulation as support).
`native_bf16` is the one test of both; `emulated_bf16` says in words why bf16 would be slow, for a
run about to use it there. `device_fails` says whether a device still computes, after an error.
"""

import torch

from .errors import SettingError


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


def gpu_has_bf16(device):
    """Whether this GPU multiplies bf16 in hardware (compute capability 8.0 or later: A100, H100, RTX 30xx…);
    `torch.cuda.is_bf16_supported()` also says yes where bf16 is only emulated (V100, T4)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def pick_device(device):
    """The device `device` names ('auto': a CUDA GPU when there is one, else the CPU), once it is known to be
    here: a GPU asked for where there is none, or one past the last, is a one-line error, not a traceback."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise SettingError("device", f"{device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cpu":
        return chosen
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if here is None or here.type != chosen.type:
        has = f"its accelerator is {here.type}" if here else "it has only its CPU (or PyTorch was built without GPUs)"
        raise SettingError("device", f"no {chosen.type} device on this machine: {has}; use auto or cpu")
    count = torch.accelerator.device_count()
    if chosen.index is not None and chosen.index >= count:
        raise SettingError("device", f"there is no {device}: this machine has {count} {chosen.type} device"
                                     f"{'s' if count > 1 else ''}, numbered from 0")
    return chosen


def native_bf16(device):
    """Whether `device` computes in bf16 in hardware: a CPU with AVX512-BF16 or AMX, a CUDA GPU of compute
    capability 8 or later; no for any other device, which this cannot tell about."""
    return cpu_has_bf16() if device.type == "cpu" else device.type == "cuda" and gpu_has_bf16(device)


def emulated_bf16(device):
    """Why bf16 arithmetic on `device` is emulated, slower than the alternative (fp16 on a GPU, fp32 on a CPU:
    20x the time of fp32 in bench/bf16.py); None where it runs in hardware, or on a device this cannot tell about."""
    if device.type not in ("cpu", "cuda") or native_bf16(device):
        return None
    if device.type == "cpu":
        return "this CPU has neither AVX512-BF16 nor AMX; bf16 is emulated here, slower than fp32"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 arithmetic; "
            f"bf16 is emulated there, without the tensor cores fp16 runs on")


def device_fails(device):
    """Why `device` can no longer compute, or None while it can. After a device-side assert or an illegal
    memory access every later CUDA call of the process fails, and only a restart mends it; a lack of
    memory is not such a failure."""
    if device.type == "cpu":
        return None
    try:
        torch.ones(1, device=device).add(1).cpu()
    except Exception as err:
        detail = str(err).strip().splitlines()
        return f"{type(err).__name__}: {detail[0] if detail else ''}"
    return None
