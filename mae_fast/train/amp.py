"""Which autocast dtype a run uses (``--amp``), and why."""
import torch

AMP_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_amp(amp: str, device: torch.device):
    """(dtype or None, reason) for --amp auto|none|bf16|fp16 on ``device``."""
    if amp == "auto":
        if device.type != "cuda":
            return None, "auto: no autocast on CPU"
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU has bf16"
        return torch.float16, "auto: this GPU has no bf16, fp16 with a grad scaler"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp], f"--amp {amp}"
