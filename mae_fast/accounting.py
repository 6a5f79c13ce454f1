"""Bytes moved, kernels launched and FLOPs of one MAE training step, counted on ``meta`` tensors
(no device), and a roofline *estimate* of its GPU time built on those counts.

``python -m mae_fast.accounting`` prints, for ViT-B/16 and ViT-L/16 at batch 256, 224 px, the
whole training step (forward + backward + AdamW step) of three contenders: mae_fast's fused path,
the official op sequence (``backend="reference"``: exactly the official ops, timm 0.3.2's math
attention) and, when ``transformers`` is installed, HF ``ViTMAEForPreTraining`` with SDPA
attention. ``--roofline`` adds the modeled step time (see ``Roofline``); ``--precision`` picks
pure bf16 or bf16 autocast with fp32 master weights.

How it counts (``TrafficCounter``, a ``TorchDispatchMode``):
  * every aten op that reaches the dispatcher is one launch and moves the bytes of its tensor
    inputs (read) plus its tensor outputs (written). A tensor's bytes are its distinct elements:
    broadcast (stride-0) dims count once. In-place ops count the mutated tensor as read and
    written, except fills (``fill_``, ``zero_``), which only write; ``out=`` buffers are only
    written. View ops, bare allocations
    and host (CPU) ops of a meta step (the optimizer's step counters) launch nothing;
  * ``_foreach_*`` / ``_fused_*`` ops launch as many kernels as PyTorch's multi-tensor-apply
    makes (``multi_tensor_launches``), not one;
  * a custom op (``torch.ops.mae_fast.*``) reaches the mode as one op through its fake impl.
    Its charge is *what its kernel loads and stores*, not its tensors: ``KERNEL_CHARGES`` holds,
    per op, the traffic and launches of its Triton / CUDA kernels (workspaces, partial sums and
    the reduction pass, only the removed patches the loss reads, the fills the op body runs
    around its kernel). The index checks (``ops/_checks.py``) are not charged: the CUDA default
    path does not run them (only ``MAE_FAST_DEBUG=1`` does). tests/test_accounting_kernels.py
    checks every Triton charge against the loads/stores its kernels really make under the
    Triton interpreter plus the torch ops the op body runs with the checks off, as on CUDA, and
    the C++ charges against the kernels' loops;
  * attention: on meta SDPA would decompose into its math ops, so ``scaled_dot_product_attention``
    is replaced while counting by a stand-in autograd function that charges what PyTorch's
    FlashAttention-2 kernels move (``flash_attention_charges``: forward q, k, v -> out + fp32
    log-sum-exp, one launch; backward three launches: the dO.O pre-pass, the main kernel with
    its fp32 dq accumulator, the dq conversion) and returns out / dq / dk / dv in the layout
    the flash kernels write ((B, M, H, K) memory). Everything autograd runs around the kernel
    is counted op by op at the aten level: the head split views and, in backward, the merge of
    dq, dk, dv into d(qkv) (a ``stack`` and a reshape copy for the sdpa layout). The math
    backend (official) is counted op by op;
  * FLOPs: PyTorch's own formulas (``torch.utils.flop_counter``) per op; the stand-in charges
    ``sdpa_flop_count`` / ``sdpa_backward_flop_count``; custom ops that do matmul work register
    theirs here (``register_flop_formula``);
  * backward ops are attributed to the forward region whose autograd nodes run them.
These are counts of what the kernels address, a model of DRAM traffic with perfect reuse inside
one kernel and none across kernels: the same rule for every contender.
"""
import argparse
import contextlib
import functools
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = float(2 ** 30)

# regions of the step; the glue is the first four
GLUE = ("masking", "encoder input", "decoder input", "loss")
REGIONS = GLUE + ("attention", "rest", "optimizer")
PHASES = ("fwd", "bwd", "optim")

# ops that address no memory and launch nothing besides views
_NO_LAUNCH = {
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::lift_fresh",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::_to_copy_meta_noop", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_same_storage_numel",
    "aten::set_.source_Storage_storage_offset", "prim::device", "profiler::_record_function_enter_new",
    "profiler::_record_function_exit._RecordFunction",
}
# in-place ops that write their destination without reading it
_WRITE_ONLY = {"aten::fill_", "aten::zero_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: broadcast (stride-0) dims count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    if t.numel() == 0:
        n = 0
    return n * t.element_size()


def _base_name(func) -> str:
    """``aten::empty.memory_format`` -> ``aten::empty``."""
    return func.name().split(".")[0]


def moves_nothing(func) -> bool:
    return (bool(getattr(func, "is_view", False)) or func.name() in _NO_LAUNCH
            or _base_name(func) in _NO_LAUNCH)


# PyTorch's multi-tensor-apply (ATen/native/cuda/MultiTensorApply.cuh): a launch takes at most
# this many tensors (by the number of tensor lists, "depth") and 320 blocks of 65536 elements
_MTA_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_MAX_BLOCKS = 320
_MTA_CHUNK = 65536


def multi_tensor_launches(lists: Sequence[Sequence[torch.Tensor]]) -> int:
    """Kernels one ``_foreach_*`` / ``_fused_*`` op launches over these tensor lists."""
    lists = [lst for lst in lists if len(lst)]
    if not lists:
        return 0
    max_tensors = _MTA_MAX_TENSORS.get(len(lists), 30)
    launches, tensors, blocks = 0, 0, 0
    for t in lists[0]:
        chunks = max(1, math.ceil(t.numel() / _MTA_CHUNK))
        tensors += 1
        while chunks:
            take = min(chunks, _MTA_MAX_BLOCKS - blocks)
            blocks += take
            chunks -= take
            if blocks == _MTA_MAX_BLOCKS or tensors == max_tensors:
                launches += 1
                blocks = 0
                tensors = 0 if not chunks else 1
    return launches + (1 if blocks else 0)


@dataclass
class OpRecord:
    phase: str
    region: str
    op: str
    read: int
    written: int
    launches: int = 1
    flops: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class Tally:
    bytes: int = 0
    ops: int = 0
    flops: int = 0

    def add(self, nbytes: int, nops: int, flops: int = 0) -> None:
        self.bytes += nbytes
        self.ops += nops
        self.flops += flops


@dataclass
class Charge:
    """What a kernel (or a custom op's kernels) loads and stores, and how often it launches."""
    read: int
    written: int
    launches: int
    flops: int = 0

    def __add__(self, other: "Charge") -> "Charge":
        return Charge(self.read + other.read, self.written + other.written,
                      self.launches + other.launches, self.flops + other.flops)


def _flops_of(func, args, kwargs, out) -> int:
    """FLOPs of an aten / custom op from torch.utils.flop_counter's registry (0 if none)."""
    from torch.utils.flop_counter import flop_registry
    packet = getattr(func, "_overloadpacket", None)
    formula = flop_registry.get(packet)
    if formula is None and packet is not None and packet.__name__.endswith("_"):
        # an in-place variant (addmm_, baddbmm_): the out-of-place op's formula
        formula = flop_registry.get(getattr(torch.ops.aten, packet.__name__[:-1], None))
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))


def _mutated_tensors(func, args, kwargs) -> List[torch.Tensor]:
    """The tensors an op writes in place (its schema's ``Tensor(a!)`` arguments)."""
    mutated = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            mutated += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return mutated


def _out_arguments(func, kwargs) -> List[torch.Tensor]:
    """The ``out=`` tensors of an out variant (``mm.out``): written, never read."""
    return [t for arg in func._schema.arguments if getattr(arg, "is_out", False)
            for t in tree_flatten(kwargs.get(arg.name))[0] if isinstance(t, torch.Tensor)]


class TrafficCounter(TorchDispatchMode):
    """Counts bytes read + written, kernels launched and FLOPs, per (phase, region).

    Use ``with counter:`` around the step, ``counter.phase = "fwd" | "bwd" | "optim"`` to say
    which part runs, and ``counter.region(name)`` (or ``instrument_mae(counter)``) around the
    functions whose ops (and whose backward ops) belong to ``name``; everything else is "rest".
    ``removed_fraction``: the mask ratio of the step, for kernels that read only the removed
    patches when the mask's values are not known (meta). ``ignore_host``: ops whose tensors are
    all on the CPU launch no GPU kernel (set when counting a meta step).
    """

    def __init__(self, keep_log: bool = True, removed_fraction: Optional[float] = None,
                 ignore_host: bool = False):
        super().__init__()
        self.tally: Dict[Tuple[str, str], Tally] = defaultdict(Tally)
        self.log: List[OpRecord] = []
        self.keep_log = keep_log
        self.removed_fraction = removed_fraction
        self.ignore_host = ignore_host
        self.phase = "fwd"
        self._stack: List[str] = []
        self._intervals: List[Tuple[int, int, str]] = []  # autograd seq numbers (lo, hi) -> region
        self._paused = 0

    # -- regions ------------------------------------------------------------------------------
    def _seq_marker(self) -> Optional[int]:
        """The autograd sequence number the next node would get (None when grad is off)."""
        if not torch.is_grad_enabled():
            return None
        self._paused += 1
        try:
            leaf = torch.empty((), device="meta", requires_grad=True)
            return leaf.view(()).grad_fn._sequence_nr()
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def region(self, name: str):
        lo = self._seq_marker()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            hi = self._seq_marker()
            if lo is not None and hi is not None:
                self._intervals.append((lo, hi, name))

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _backward_region(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return "rest"
        seq = node._sequence_nr()
        best = None
        for lo, hi, name in self._intervals:  # innermost region: the latest start
            if lo < seq < hi and (best is None or lo > best[0]):
                best = (lo, name)
        return best[1] if best else "rest"

    def current_region(self) -> str:
        if self.phase == "optim":
            return "optimizer"
        if self.phase == "bwd":
            return self._backward_region()
        return self._stack[-1] if self._stack else "rest"

    def add(self, region: str, op: str, read: int, written: int, nops: int = 1,
            phase: Optional[str] = None, flops: int = 0) -> None:
        phase = phase or self.phase
        self.tally[(phase, region)].add(read + written, nops, flops)
        if self.keep_log:
            self.log.append(OpRecord(phase, region, op, read, written, nops, flops))

    # -- the mode -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused or moves_nothing(func):
            return out
        region = self.current_region()
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not ins and not outs:  # dtype arithmetic (promote_types) and the like: no kernel
            return out
        if self.ignore_host and all(t.device.type == "cpu" for t in ins + outs):
            return out
        name = func.name()
        charge_fn = KERNEL_CHARGES.get(name)
        if charge_fn is not None:
            charge = charge_fn(self, args, kwargs, out)
            charge.flops = charge.flops or _flops_of(func, args, kwargs, out)
        else:
            # in-place / out= ops write their mutated arguments (foreach and fused ops return None)
            mutated = _mutated_tensors(func, args, kwargs)
            written = (sum(tensor_bytes(t) for t in mutated)
                       + sum(tensor_bytes(t) for t in outs if not any(t is m for m in mutated)))
            if _base_name(func) in _WRITE_ONLY:
                read, written = 0, tensor_bytes(args[0])
            else:  # an out= buffer is written, not read
                outs_given = _out_arguments(func, kwargs)
                read = sum(tensor_bytes(t) for t in ins if not any(t is o for o in outs_given))
            launches = 1
            if name.startswith(("aten::_foreach_", "aten::_fused_")):
                lists = [a for a in args if isinstance(a, (list, tuple))
                         and a and isinstance(a[0], torch.Tensor)]
                if name.startswith(("aten::_fused_adam", "aten::_fused_sgd")):
                    # the fused optimizers write params and state, and the grads only to unscale
                    # them (grad_scale given); the step counts ride along, not as a list
                    written = sum(tensor_bytes(t) for lst in (args[0], *args[2:4]) for t in lst)
                    if kwargs.get("grad_scale") is not None:
                        written += sum(tensor_bytes(t) for t in args[1])
                    lists = [lst for lst in args[:5] if lst]
                launches = multi_tensor_launches(lists)
            charge = Charge(read, written, launches, _flops_of(func, args, kwargs, out))
        self.add(region, name, charge.read, charge.written, charge.launches, flops=charge.flops)
        return out

    # -- results ------------------------------------------------------------------------------
    def total(self, regions=REGIONS, phases=PHASES) -> Tally:
        t = Tally()
        for (phase, region), v in self.tally.items():
            if phase in phases and region in regions:
                t.add(v.bytes, v.ops, v.flops)
        return t


# ---- what the custom ops' kernels move -------------------------------------------------------
#
# One function per torch.ops.mae_fast op: (counter, args, kwargs, out) -> Charge. Each is the
# kernel's loop structure written out (distinct bytes each launch loads / stores), plus the
# torch ops the op body runs around its kernel on CUDA's default path (a zero fill; no index
# check: ops/_checks.py). tests/test_accounting_kernels.py holds each one against the real
# kernel.

def _el(t: torch.Tensor) -> int:
    return t.element_size()


def _distinct_rows(ids: torch.Tensor, num_rows: int) -> int:
    """How many distinct values ``ids`` holds (at most num_rows); on meta: as many as can be."""
    if ids.device.type == "meta":
        return min(num_rows, ids.numel())
    return int(torch.unique(ids).numel())


def _removed(counter: TrafficCounter, mask: torch.Tensor) -> int:
    """Number of removed (mask != 0) patches; on meta from the counter's mask ratio."""
    if mask.device.type != "meta":
        return int((mask != 0).sum())
    if counter.removed_fraction is None:
        return mask.numel()  # unknown: every patch (an upper bound)
    from .reference import num_keep
    N, L = mask.shape
    return N * (L - num_keep(L, counter.removed_fraction))


def _charge_gather_patches(counter, args, kwargs, out):
    ids_keep = args[1]
    # _patch_copy_kernel, one program per kept patch: ids_keep[n, k], its C*p*p pixels -> patches
    return Charge(tensor_bytes(ids_keep) + tensor_bytes(out), tensor_bytes(out), 1)


def _charge_gather_patches_normalized(counter, args, kwargs, out):
    imgs, ids_keep, p, pixel_norm = args[:4]
    N, K = ids_keep.shape
    # _patch_copy_kernel (NORMALIZE), one program per kept patch: ids_keep[n, k], its C*p*p
    # uint8 pixels and the (2, C) fp32 mean/std -> normalised patches (the kept pixels only)
    read = tensor_bytes(ids_keep) + N * K * imgs.shape[1] * p * p * _el(imgs) + tensor_bytes(pixel_norm)
    return Charge(read, tensor_bytes(out), 1)


def _pixel_norm_arg(args, kwargs, index):
    """The optional pixel_norm argument of the loss ops (uint8 images), or None."""
    return args[index] if len(args) > index else kwargs.get("pixel_norm")


def _charge_scatter_patches(counter, args, kwargs, out):
    grad_patches, ids_keep = args[:2]
    zero_fill = Charge(0, tensor_bytes(out), 1)  # grad_imgs.zero_()
    kernel = Charge(tensor_bytes(ids_keep) + tensor_bytes(grad_patches), tensor_bytes(grad_patches), 1)
    return zero_fill + kernel


def _charge_add_pos_cls(counter, args, kwargs, out):
    x, pos_embed, cls_token, ids_keep = args[:4]
    N, K, D = x.shape
    L = pos_embed.shape[1] - 1
    pos_rows = 1 + _distinct_rows(ids_keep, L)  # pos[0] + the rows ids_keep picks
    read = (tensor_bytes(x) + tensor_bytes(ids_keep) + pos_rows * D * _el(pos_embed)
            + D * _el(cls_token))
    return Charge(read, tensor_bytes(out), 1)


def _charge_add_pos_cls_backward(counter, args, kwargs, out):
    grad_out = args[0]
    grad_x, grad_cls = out
    # cls programs read grad_out[:, 0], row programs grad_out[:, 1:]: the whole of it once
    return Charge(tensor_bytes(grad_out), tensor_bytes(grad_x) + tensor_bytes(grad_cls), 1)


def _charge_patch_embed_gemm(counter, args, kwargs, out):
    imgs, weight, bias, pos_embed, cls_token, ids_keep = args[:6]
    N, C, H, W = imgs.shape
    D, p = weight.shape[0], weight.shape[-1]
    K = ids_keep.shape[1]
    L = (H // p) * (W // p)
    pos_rows = 1 + _distinct_rows(ids_keep, L)
    pixel_norm = _pixel_norm_arg(args, kwargs, 7)  # uint8 imgs: the (2, C) mean/std too
    read = (tensor_bytes(ids_keep) + N * K * C * p * p * _el(imgs) + tensor_bytes(weight)
            + (tensor_bytes(bias) if bias is not None else 0) + pos_rows * D * _el(pos_embed)
            + D * _el(cls_token) + (tensor_bytes(pixel_norm) if pixel_norm is not None else 0))
    return Charge(read, tensor_bytes(out), 1)


def _charge_patch_embed_gemm_backward(counter, args, kwargs, out):
    grad_out, imgs, ids_keep, weight_shape = args[:4]
    C = imgs.shape[1]
    p = weight_shape[-1]
    N, K = ids_keep.shape
    pixel_norm = _pixel_norm_arg(args, kwargs, 8)
    read = (tensor_bytes(grad_out) + tensor_bytes(ids_keep) + N * K * C * p * p * _el(imgs)
            + (tensor_bytes(pixel_norm) if pixel_norm is not None else 0))
    return Charge(read, sum(tensor_bytes(t) for t in out), 1)


def _charge_masked_loss(counter, args, kwargs, out):
    imgs, pred, mask, p = args[:4]
    loss, mask_sum = out
    N, L, P = pred.shape
    removed = _removed(counter, mask)
    patch_loss = N * L * 4  # the fp32 per-patch workspace
    # kernel 1: mask, and imgs + pred of removed patches only -> patch_loss
    # (uint8 images: 1 byte a pixel, plus the (2, C) mean/std when any patch is read)
    pixel_norm = _pixel_norm_arg(args, kwargs, 5)
    stats = tensor_bytes(pixel_norm) if pixel_norm is not None and removed else 0
    fwd = Charge(tensor_bytes(mask) + removed * P * (_el(imgs) + _el(pred)) + stats, patch_loss, 1)
    # kernel 2 (one program): patch_loss + mask -> loss, mask_sum
    reduce = Charge(patch_loss + tensor_bytes(mask), tensor_bytes(loss) + tensor_bytes(mask_sum), 1)
    return fwd + reduce


def _charge_masked_loss_backward(counter, args, kwargs, out):
    grad_loss, imgs, pred, mask, mask_sum, p, norm_pix, grad_imgs_wanted = args[:8]
    grad_pred, grad_imgs = out
    N, L, P = pred.shape
    removed = _removed(counter, mask)
    pixel_norm = _pixel_norm_arg(args, kwargs, 8)
    stats = tensor_bytes(pixel_norm) if pixel_norm is not None and removed else 0
    read = (tensor_bytes(mask) + tensor_bytes(grad_loss) + tensor_bytes(mask_sum)
            + removed * P * (_el(imgs) + _el(pred)) + stats)
    # grad_pred is written for every patch (zeros where kept); grad_imgs for every whole patch
    written = tensor_bytes(grad_pred) + (N * L * P * _el(imgs) if grad_imgs_wanted else 0)
    return Charge(read, written, 1)


def _charge_masked_loss_rows(counter, args, kwargs, out):
    # decoder-side masking (ROW_IDS): every row of pred_rows is a decoded patch
    imgs, pred_rows, row_ids = args[:3]
    loss, count = out
    N, R, P = pred_rows.shape
    patch_loss = N * R * 4
    # kernel 1: row_ids, imgs + pred of every row -> patch_loss
    fwd = Charge(tensor_bytes(row_ids) + N * R * P * (_el(imgs) + _el(pred_rows)), patch_loss, 1)
    # kernel 2 (one program, no mask to read): patch_loss -> loss, count
    reduce = Charge(patch_loss, tensor_bytes(loss) + tensor_bytes(count), 1)
    return fwd + reduce


def _charge_masked_loss_rows_backward(counter, args, kwargs, out):
    grad_loss, imgs, pred_rows, row_ids, count, p, norm_pix, grad_imgs_wanted = args[:8]
    grad_pred, grad_imgs = out
    N, R, P = pred_rows.shape
    read = (tensor_bytes(row_ids) + tensor_bytes(grad_loss) + tensor_bytes(count)
            + N * R * P * (_el(imgs) + _el(pred_rows)))
    kernel = Charge(read, tensor_bytes(grad_pred) + (N * R * P * _el(imgs) if grad_imgs_wanted else 0), 1)
    # grad_imgs.zero_(): only the rows' patches are written by the kernel
    zero_fill = Charge(0, tensor_bytes(grad_imgs), 1) if grad_imgs_wanted else Charge(0, 0, 0)
    return zero_fill + kernel


def _charge_random_masking(counter, args, kwargs, out):
    # random_masking_kernel: one block per row reads the row of noise, writes the three outputs
    return Charge(tensor_bytes(args[0]), sum(tensor_bytes(t) for t in out), 1)


def _decoded_pos_rows(ids_restore: torch.Tensor, rows: int) -> int:
    """Decoder-side masking: pos rows the forward reads, cls + the patches some sample decodes
    (ids_restore < rows); on meta every patch (an upper bound)."""
    if ids_restore.device.type == "meta":
        return 1 + ids_restore.shape[1]
    return 1 + int((ids_restore < rows).any(dim=0).sum())


def _charge_unshuffle_scatter(counter, args, kwargs, out):
    # forward_kernel: each source slot reads ids_restore[n, l], its source row (a kept row of x or
    # the mask token) and its pos row, writes its output row (none if dropped: len_decode >= 0)
    x, mask_token, ids_restore = args[:3]
    pos = args[3] if len(args) > 3 else kwargs.get("pos_embed")
    len_decode = args[4] if len(args) > 4 else kwargs.get("len_decode", -1)
    if pos is None:
        pos_read = 0
    elif len_decode < 0:
        pos_read = tensor_bytes(pos)
    else:
        pos_read = _decoded_pos_rows(ids_restore, x.shape[1] - 1 + len_decode) * pos.shape[2] * _el(pos)
    read = tensor_bytes(x) + tensor_bytes(mask_token) + tensor_bytes(ids_restore) + pos_read
    return Charge(read, tensor_bytes(out), 1)


# rows of the output per backward chunk (csrc/unshuffle_index.h kRowsPerChunk)
UNSHUFFLE_ROWS_PER_CHUNK = 32


def _charge_unshuffle_scatter_backward(counter, args, kwargs, out):
    grad_out, ids_restore, len_keep = args[:3]
    grad_x, grad_mask_token = out
    N, L = ids_restore.shape  # chunks of source slots (grad_out has 1+L or 1+K+M rows)
    D = grad_out.shape[2]
    acc = 8 if grad_out.dtype == torch.float64 else 4
    partial = N * math.ceil(L / UNSHUFFLE_ROWS_PER_CHUNK) * D * acc  # (N, chunks, D) fp32
    rows = Charge(tensor_bytes(grad_out) + tensor_bytes(ids_restore),
                  tensor_bytes(grad_x) + partial, 1)  # backward_rows_kernel
    reduce = Charge(partial, tensor_bytes(grad_mask_token), 1)  # reduce_partials_kernel
    return rows + reduce


def _charge_add_layer_norm(counter, args, kwargs, out):
    x, branch, weight, bias = args[:4]
    h, y, mean, rstd = out
    # _add_ln_fwd_kernel, tiles of rows: x (+ branch) -> h (with a branch), y, mean, rstd
    read = tensor_bytes(x) + (tensor_bytes(branch) if branch is not None else 0) \
        + tensor_bytes(weight) + tensor_bytes(bias)
    written = sum(tensor_bytes(t) for t in out)
    return Charge(read, written, 1 if x.shape[0] else 0)


def _charge_add_layer_norm_backward(counter, args, kwargs, out):
    from .ops.layernorm import bwd_programs
    dy, dh, h, weight, mean, rstd = args[:6]
    dsum, dweight, dbias = out
    R, D = h.shape
    partials = 2 * bwd_programs(R, D)[0] * D * 4  # fp32 (programs, D) partial sums of dweight, dbias
    # _add_ln_bwd_kernel: dy, dh, h, the row stats, weight -> dsum, the partials
    rows = Charge(sum(tensor_bytes(t) for t in (dy, h, mean, rstd, weight))
                  + (tensor_bytes(dh) if dh is not None else 0),
                  tensor_bytes(dsum) + partials, 1 if R else 0)
    # _ln_grad_reduce_kernel: the partials -> dweight, dbias
    reduce = Charge(partials, tensor_bytes(dweight) + tensor_bytes(dbias), 1)
    return rows + reduce


def _charge_mlp_fc1_gelu(counter, args, kwargs, out):
    x, weight, bias = args[:3]
    # _mlp_gemm_kernel (forward epilogue): x, W1, b1 -> pre and act, both stored
    read = tensor_bytes(x) + tensor_bytes(weight) + (tensor_bytes(bias) if bias is not None else 0)
    return Charge(read, sum(tensor_bytes(t) for t in out), 1)


def _charge_mlp_fc2(counter, args, kwargs, out):
    act, pre, weight, bias = args[:4]
    residual = args[4] if len(args) > 4 else kwargs.get("residual")
    # no residual: the body is F.linear(act, W2, b2), one aten::addmm (pre is only saved for
    # backward); with one: _mlp_gemm_kernel's residual epilogue, which also reads the residual
    read = tensor_bytes(act) + tensor_bytes(weight) + (tensor_bytes(bias) if bias is not None else 0)
    return Charge(read + (tensor_bytes(residual) if residual is not None else 0), tensor_bytes(out), 1)


def _charge_linear_residual(counter, args, kwargs, out):
    a, weight, bias, residual = args[:4]
    # _mlp_gemm_kernel (residual epilogue): a, W, b and the residual -> out
    read = tensor_bytes(a) + tensor_bytes(weight) + (tensor_bytes(bias) if bias is not None else 0) \
        + tensor_bytes(residual)
    return Charge(read, tensor_bytes(out), 1 if out.numel() else 0)


def _charge_mlp_fc2_gelu_grad(counter, args, kwargs, out):
    grad_y, weight, pre = args[:3]
    # _mlp_gemm_kernel (GELU' epilogue): dy, W2 and the saved pre -> d(pre)
    return Charge(tensor_bytes(grad_y) + tensor_bytes(weight) + tensor_bytes(pre), tensor_bytes(out), 1)


def _linear_weight_grad_parts(args, kwargs):
    """The column parts of G a mae_fast::linear_weight_grad call passes: grad_out, grad_out_1, grad_out_2."""
    parts = [args[0]] + list(args[2:4]) + [kwargs.get(k) for k in ("grad_out_1", "grad_out_2")]
    return [g for g in parts if g is not None]


def _charge_linear_weight_grad(counter, args, kwargs, out):
    inp = args[1]
    # _linear_wgrad_kernel: each part of G (1 or 3: the qkv projection's dq, dk, dv) and X once
    # -> dW and db, one launch
    return Charge(sum(tensor_bytes(g) for g in _linear_weight_grad_parts(args, kwargs)) + tensor_bytes(inp),
                  sum(tensor_bytes(t) for t in out), 1)


KERNEL_CHARGES: Dict[str, Callable[..., Charge]] = {
    "mae_fast::gather_patches": _charge_gather_patches,
    "mae_fast::gather_patches_normalized": _charge_gather_patches_normalized,
    "mae_fast::scatter_patches": _charge_scatter_patches,
    "mae_fast::add_pos_cls": _charge_add_pos_cls,
    "mae_fast::add_pos_cls_backward": _charge_add_pos_cls_backward,
    "mae_fast::patch_embed_gemm": _charge_patch_embed_gemm,
    "mae_fast::patch_embed_gemm_backward": _charge_patch_embed_gemm_backward,
    "mae_fast::masked_loss": _charge_masked_loss,
    "mae_fast::masked_loss_backward": _charge_masked_loss_backward,
    "mae_fast::random_masking": _charge_random_masking,
    "mae_fast::unshuffle_scatter": _charge_unshuffle_scatter,
    "mae_fast::unshuffle_scatter_backward": _charge_unshuffle_scatter_backward,
    "mae_fast::add_layer_norm": _charge_add_layer_norm,
    "mae_fast::add_layer_norm_backward": _charge_add_layer_norm_backward,
    "mae_fast::mlp_fc1_gelu": _charge_mlp_fc1_gelu,
    "mae_fast::mlp_fc2": _charge_mlp_fc2,
    "mae_fast::mlp_fc2_gelu_grad": _charge_mlp_fc2_gelu_grad,
    "mae_fast::linear_weight_grad": _charge_linear_weight_grad,
    "mae_fast::linear_residual": _charge_linear_residual,
    "mae_fast::masked_loss_rows": _charge_masked_loss_rows,
    "mae_fast::masked_loss_rows_backward": _charge_masked_loss_rows_backward,
}


# ---- FLOP formulas of the custom ops that do matmul work -------------------------------------

def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula
    from .ops import patch_embed  # noqa: F401  (defines the ops)

    @register_flop_formula(torch.ops.mae_fast.patch_embed_gemm)
    def _patch_embed_gemm_flop(imgs_shape, weight_shape, bias_shape, pos_shape, cls_shape,
                               ids_shape, compute_dtype, *args, out_shape=None, **kwargs) -> int:
        """tokens (N*K, D) = patches (N*K, C*p*p) @ W^T: 2 N K D Cpp."""
        N, K = ids_shape
        D = weight_shape[0]
        return 2 * N * K * D * math.prod(weight_shape[1:])

    @register_flop_formula(torch.ops.mae_fast.patch_embed_gemm_backward)
    def _patch_embed_gemm_backward_flop(grad_out_shape, imgs_shape, ids_shape, weight_shape,
                                        *args, out_shape=None, **kwargs) -> int:
        """grad_weight (D, C*p*p) = grad_tokens^T (D, N*K) @ patches (N*K, C*p*p)."""
        N, K = ids_shape
        return 2 * N * K * weight_shape[0] * math.prod(weight_shape[1:])


_register_flop_formulas()


def _register_mlp_flop_formulas() -> None:
    """The opt-in MLP GEMMs (mae_fast.ops.mlp): 2 M N K each, as aten's mm / addmm formulas."""
    from torch.utils.flop_counter import register_flop_formula
    from .ops import mlp  # noqa: F401  (defines the ops)

    @register_flop_formula(torch.ops.mae_fast.mlp_fc1_gelu)
    def _fc1(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        """pre (M, N) = x (M, K) @ W1^T (K, N)."""
        return 2 * x_shape[0] * weight_shape[0] * weight_shape[1]

    @register_flop_formula(torch.ops.mae_fast.mlp_fc2)
    def _fc2(act_shape, pre_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        """y (M, C) = act (M, H) @ W2^T (H, C)."""
        return 2 * act_shape[0] * weight_shape[0] * weight_shape[1]

    @register_flop_formula(torch.ops.mae_fast.linear_residual)
    def _linear_residual(a_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        """out (M, N) = residual + a (M, K) @ W^T (K, N): the GEMM's 2 M N K (the add, like
        aten's addmm bias, is not counted)."""
        return 2 * a_shape[0] * weight_shape[0] * weight_shape[1]

    @register_flop_formula(torch.ops.mae_fast.mlp_fc2_gelu_grad)
    def _fc2_gelu_grad(grad_y_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        """d(act) (M, H) = dy (M, C) @ W2 (C, H)."""
        return 2 * grad_y_shape[0] * weight_shape[0] * weight_shape[1]

    @register_flop_formula(torch.ops.mae_fast.linear_weight_grad)
    def _linear_weight_grad(grad_out_shape, inp_shape, *args, out_shape=None, **kwargs) -> int:
        """dW (P N, K) = G^T (P N, M) @ X (M, K), G in P column parts (M, N) (grad_out_1 / _2)."""
        parts = 1 + sum(s is not None for s in list(args[:2]) + [kwargs.get("grad_out_1"), kwargs.get("grad_out_2")])
        return 2 * grad_out_shape[0] * parts * grad_out_shape[1] * inp_shape[1]


_register_mlp_flop_formulas()


# ---- attention: the flash kernel as one charge, everything around it op by op ---------------

def flash_attention_bytes(B: int, M: int, C: int, H: int, elem: int) -> Tuple[int, int]:
    """(forward, backward) bytes of a flash-style attention on q, k, v (B, M, C), H heads, the
    kernel alone: forward reads q, k, v and writes out + the fp32 log-sum-exp (B, H, M);
    backward reads q, k, v, out, dout, lse and writes dq, dk, dv (see flash_attention_charges
    for the launches and workspaces of PyTorch's FlashAttention-2 backward)."""
    tok = B * M * C * elem
    lse = B * H * M * 4
    return 4 * tok + lse, 8 * tok + lse


def flash_attention_charges(B: int, M: int, C: int, H: int, elem: int
                            ) -> Tuple[List[Tuple[str, Charge]], List[Tuple[str, Charge]]]:
    """The kernels of PyTorch's FlashAttention-2 path (``_flash_attention_forward`` /
    ``_flash_attention_backward``) on q, k, v (B, M, C), H heads -> (forward, backward) lists of
    (kernel, Charge), FLOPs not included:
      forward  flash_fwd: q, k, v -> out, lse (fp32 (B, H, M));
      backward flash_bwd_dot_do_o: out, dout -> D = rowsum(dout * out) (fp32 (B, H, M)), and
               clears the fp32 dq accumulator (B, M, C);
               flash_bwd: q, k, v, dout, lse, D -> dk, dv, dq accumulated in fp32;
               flash_bwd_convert_dq: the fp32 accumulator -> dq."""
    tok = B * M * C * elem
    row = B * H * M * 4
    acc = B * M * C * 4
    forward = [("flash_fwd", Charge(3 * tok, tok + row, 1))]
    backward = [
        ("flash_bwd_dot_do_o", Charge(2 * tok, row + acc, 1)),
        ("flash_bwd", Charge(4 * tok + 2 * row + acc, 2 * tok + acc, 1)),
        ("flash_bwd_convert_dq", Charge(acc, tok, 1)),
    ]
    return forward, backward


class _FlashStandIn(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` while counting: charges the flash kernels
    and returns out / dq / dk / dv laid out as the flash kernels write them: (B, M, H, K) memory
    seen as (B, H, M, K)."""

    @staticmethod
    def forward(ctx, counter, label, q, k, v):
        from torch.utils.flop_counter import sdpa_flop_count
        B, H, M, Kq = q.shape
        Kv = v.shape[-1]
        with counter.paused():
            out = q.new_empty((B, M, H, Kv)).transpose(1, 2)
        fwd, _ = flash_attention_charges(B, M, H * Kv, H, q.element_size())
        flops = sdpa_flop_count(q.shape, k.shape, v.shape)
        for kernel, c in fwd:
            counter.add(counter.current_region(), f"{label}: {kernel}", c.read, c.written, c.launches,
                        flops=flops)
        ctx.counter, ctx.label = counter, label
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.device = q.device
        return out

    @staticmethod
    def backward(ctx, dout):
        from torch.utils.flop_counter import sdpa_backward_flop_count
        counter = ctx.counter
        (qs, ks, vs) = ctx.shapes
        B, H, M, Kq = qs
        _, bwd = flash_attention_charges(B, M, H * vs[-1], H, dout.element_size())
        flops = sdpa_backward_flop_count(dout.shape, qs, ks, vs)
        region = counter.current_region()
        for kernel, c in bwd:
            counter.add(region, f"{ctx.label}: {kernel}", c.read, c.written, c.launches,
                        flops=flops if kernel == "flash_bwd" else 0)
        with counter.paused():
            grads = [torch.empty((s[0], s[2], s[1], s[3]), dtype=dt, device=ctx.device).transpose(1, 2)
                     for s, dt in zip(ctx.shapes, ctx.dtypes)]
        return (None, None, *grads)


def _flash_sdpa(counter: TrafficCounter, label: str):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        if attn_mask is not None or dropout_p != 0.0 or is_causal or enable_gqa:
            raise NotImplementedError("the counted flash stand-in covers MAE's attention only "
                                      "(no mask, no dropout, not causal)")
        return _FlashStandIn.apply(counter, label, query, key, value)
    return sdpa


@contextlib.contextmanager
def flash_attention_counted(counter: TrafficCounter, label: str = "flash attention (sdpa)"):
    """While active, ``F.scaled_dot_product_attention`` is the counted flash stand-in."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa(counter, label)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _patched(patches):
    done = []
    try:
        for obj, name, value in patches:
            done.append((obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(done):
            setattr(obj, name, value)


def _in_region(counter, region, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with counter.region(region):
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def instrument_mae(counter: TrafficCounter):
    """Route mae_fast's glue functions and attention through ``counter``'s regions; SDPA is the
    counted flash stand-in meanwhile."""
    from . import attention, layers, model, ops

    patches = [
        (ops, "masking_indices", _in_region(counter, "masking", ops.masking_indices)),
        (ops, "patch_embed_masked", _in_region(counter, "encoder input", ops.patch_embed_masked)),
        (ops, "unshuffle", _in_region(counter, "decoder input", ops.unshuffle)),
        (ops, "masked_loss", _in_region(counter, "loss", ops.masked_loss)),
        # decoder-side masking (decoder_mask_ratio > 0)
        (ops, "unshuffle_subset", _in_region(counter, "decoder input", ops.unshuffle_subset)),
        (ops, "masked_loss_rows", _in_region(counter, "loss", ops.masked_loss_rows)),
        (model.reference, "decoder_ids", _in_region(counter, "decoder input", model.reference.decoder_ids)),
    ]
    noise = model.MaskedAutoencoderViT.__dict__.get("_noise")  # draws the masking noise
    if isinstance(noise, staticmethod):
        patches.append((model.MaskedAutoencoderViT, "_noise",
                        staticmethod(_in_region(counter, "masking", noise.__func__))))
    # the qkv projection + attention (fused or plain) and any direct attend call
    for fn_name in ("attend", "qkv_attention"):
        fn = getattr(attention, fn_name)
        counted = _in_region(counter, "attention", fn)
        for mod in (layers, attention):
            if mod.__dict__.get(fn_name) is fn:
                patches.append((mod, fn_name, counted))
    with _patched(patches), flash_attention_counted(counter):
        yield counter


@contextlib.contextmanager
def instrument_hf(counter: TrafficCounter):
    """HF ViTMAE's regions: masking (random_masking), encoder input (the embeddings), attention
    (its SDPA attention function: the head transposes and the flash stand-in). HF's decoder
    input and loss are inline code of larger functions and count as "rest"."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.vit_mae import modeling_vit_mae as hf

    emb = hf.ViTMAEEmbeddings
    patches = [
        (emb, "random_masking", _in_region(counter, "masking", emb.random_masking)),
        (emb, "forward", _in_region(counter, "encoder input", emb.forward)),
    ]
    sdpa_fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _in_region(counter, "attention", sdpa_fn)
    try:
        with _patched(patches), flash_attention_counted(counter):
            yield counter
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_fn


# ---- bf16 autocast with fp32 master weights, on meta ------------------------------------------

# CUDA autocast's policies (aten/src/ATen/autocast_mode.cpp) for the functions an MAE step calls
_AUTOCAST_LOWER = {"linear", "conv2d", "matmul", "__matmul__", "bmm", "mm", "addmm", "baddbmm",
                   "scaled_dot_product_attention", "conv1d", "conv3d"}
_AUTOCAST_FP32 = {"layer_norm", "softmax", "log_softmax", "pow", "__pow__", "mse_loss", "group_norm"}


class MetaAutocast(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` on meta tensors, which real autocast ignores: the
    functions CUDA autocast runs in lower precision get their fp32 inputs cast to ``dtype``
    (``Tensor.to``: an ``_to_copy`` op that autograd records, as autocast's casts are), the
    ones it runs in fp32 get lower-precision inputs cast to fp32. Other functions run as given
    (type promotion: a bf16 GEMM output + an fp32 residual is fp32, as on the GPU). Not
    modeled: autocast's cache of casted weights (each MAE weight is used once a step)."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._saved = None

    def __enter__(self):
        # mae_fast.attention.qkv_attention makes autocast's casts itself: tell it autocast is on
        from . import attention
        self._saved = attention._autocast_dtype
        attention._autocast_dtype = lambda device_type: self.dtype if device_type == "meta" \
            else self._saved(device_type)
        return super().__enter__()

    def __exit__(self, *exc):
        from . import attention
        attention._autocast_dtype = self._saved
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _AUTOCAST_LOWER:
            cast = lambda t: t.to(self.dtype) if t.dtype == torch.float32 else t  # noqa: E731
        elif name in _AUTOCAST_FP32:
            cast = lambda t: t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t  # noqa: E731
        else:
            return func(*args, **kwargs)

        def conv(a):
            return cast(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        return func(*[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()})


# ---- one step on meta ------------------------------------------------------------------------

MODELS = {
    "vit_b16": "mae_vit_base_patch16",
    "vit_l16": "mae_vit_large_patch16",
    "vit_h14": "mae_vit_huge_patch14",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# "bf16": parameters, activations, gradients and optimizer state in bf16;
# "amp-bf16": fp32 parameters (master weights) and optimizer state, bf16 autocast
PRECISIONS = ("bf16", "amp-bf16")
OPTIMIZERS = ("fused", "foreach", "none")
# AdamW as MAE pretrains (lr 1.5e-4 x batch / 256, betas (0.9, 0.95), weight decay 0.05)
ADAMW = dict(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)


def build_meta_model(arch, backend: str, dtype: torch.dtype, **kwargs):
    """``arch``: a name of MODELS, a factory name of mae_fast.model, or a callable taking
    ``backend=`` (e.g. ``functools.partial(MaskedAutoencoderViT, embed_dim=...)``)."""
    from . import model as model_mod
    factory = arch if callable(arch) else getattr(model_mod, MODELS.get(arch, arch))
    with torch.device("meta"):
        mae = factory(backend=backend, **kwargs)
    return mae.to(dtype)


def hf_config_like(mae, mask_ratio: float = 0.75):
    """A transformers ViTMAEConfig with ``mae``'s shapes (SDPA attention)."""
    from transformers import ViTMAEConfig
    blk, dblk = mae.blocks[0], mae.decoder_blocks[0]
    D, Dd = mae.cls_token.shape[-1], mae.mask_token.shape[-1]
    config = ViTMAEConfig(
        hidden_size=D, num_hidden_layers=len(mae.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, decoder_hidden_size=Dd,
        decoder_num_hidden_layers=len(mae.decoder_blocks),
        decoder_num_attention_heads=dblk.attn.num_heads,
        decoder_intermediate_size=dblk.mlp.fc1.out_features,
        image_size=mae.patch_embed.img_size[0], patch_size=mae.patch_size,
        num_channels=mae.in_chans, qkv_bias=True, mask_ratio=mask_ratio,
        norm_pix_loss=mae.norm_pix_loss, layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    return config


def build_meta_hf(mae, dtype: torch.dtype, mask_ratio: float = 0.75):
    from transformers import ViTMAEForPreTraining
    with torch.device("meta"):
        hf = ViTMAEForPreTraining(hf_config_like(mae, mask_ratio))
    return hf.to(dtype)


def _optimizer_step(counter: TrafficCounter, params: List[torch.nn.Parameter], optimizer: str) -> None:
    """One AdamW step in steady state (state already there), counted in phase "optim"."""
    if optimizer == "none":
        return
    params = [p for p in params if p.grad is not None]
    if optimizer == "foreach":
        opt = torch.optim.AdamW(params, foreach=True, **ADAMW)
        with counter.paused():
            opt.step()  # creates the state; the counted step below is a steady one
        counter.phase = "optim"
        opt.step()
        return
    # fused: torch.optim refuses meta tensors, so call the fused kernel PyTorch's AdamW(fused=True)
    # calls, on the same lists
    with counter.paused():
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.ones((), device=p.device) for p in params]
    counter.phase = "optim"
    beta1, beta2 = ADAMW["betas"]
    torch._fused_adamw_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                        lr=ADAMW["lr"], beta1=beta1, beta2=beta2, weight_decay=ADAMW["weight_decay"],
                        eps=ADAMW["eps"], amsgrad=False, maximize=False)


def _step(counter, model, run_loss, optimizer, precision) -> TrafficCounter:
    autocast = MetaAutocast(torch.bfloat16) if precision == "amp-bf16" else contextlib.nullcontext()
    with counter:
        counter.phase = "fwd"
        with autocast:
            loss = run_loss()
        counter.phase = "bwd"
        loss.backward()
        _optimizer_step(counter, list(model.parameters()), optimizer)
    return counter


def _model_dtype(precision_or_dtype) -> Tuple[torch.dtype, str]:
    if isinstance(precision_or_dtype, torch.dtype):
        return precision_or_dtype, "dtype"
    if precision_or_dtype == "amp-bf16":
        return torch.float32, "amp-bf16"
    return DTYPES[precision_or_dtype], precision_or_dtype


def count_step(mae, batch: int, mask_ratio: float = 0.75, keep_log: bool = True,
               optimizer: str = "none", precision: str = "bf16",
               uint8_images: bool = False) -> TrafficCounter:
    """Forward + backward (+ an AdamW step unless ``optimizer="none"``) of ``mae`` (on meta)
    for one batch; ``precision="amp-bf16"`` runs the forward under (meta) bf16 autocast (build
    the model in fp32 for it). ``uint8_images``: the batch is uint8 pixels, normalised inside
    the kernels (ImageNet mean/std set on the model if it has none). Returns the counter."""
    H, W = mae.patch_embed.img_size
    img_dtype = torch.float32 if precision == "amp-bf16" else mae.cls_token.dtype
    if uint8_images:
        img_dtype = torch.uint8
        if mae.pixel_norm is None:
            from .data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
            mae.set_input_normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    imgs = torch.empty(batch, mae.in_chans, H, W, device="meta", dtype=img_dtype)
    counter = TrafficCounter(keep_log=keep_log, removed_fraction=mask_ratio, ignore_host=True)
    with instrument_mae(counter):
        return _step(counter, mae, lambda: mae(imgs, mask_ratio=mask_ratio)[0], optimizer, precision)


def count_hf_step(hf, batch: int, keep_log: bool = True, optimizer: str = "none",
                  precision: str = "bf16") -> TrafficCounter:
    """The same step for HF ViTMAEForPreTraining (its own mask ratio, from its config)."""
    cfg = hf.config
    img_dtype = torch.float32 if precision == "amp-bf16" else next(hf.parameters()).dtype
    imgs = torch.empty(batch, cfg.num_channels, cfg.image_size, cfg.image_size, device="meta",
                       dtype=img_dtype)
    counter = TrafficCounter(keep_log=keep_log, removed_fraction=cfg.mask_ratio, ignore_host=True)
    with instrument_hf(counter):
        return _step(counter, hf, lambda: hf(pixel_values=imgs).loss, optimizer, precision)


@dataclass
class GlueFloor:
    """The glue's compulsory traffic: the image read once, and every tensor the glue takes in or
    gives out (tokens, predictions and their gradients) read or written once."""
    terms: List[Tuple[str, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.terms)


def glue_floor(mae, batch: int, mask_ratio: float = 0.75) -> GlueFloor:
    from .reference import num_keep
    e = mae.cls_token.element_size()
    C = mae.in_chans
    H, W = mae.patch_embed.img_size
    L = mae.patch_embed.num_patches
    K = num_keep(L, mask_ratio)
    D = mae.cls_token.shape[-1]
    Dd = mae.mask_token.shape[-1]
    P = mae.patch_size ** 2 * C
    N = batch
    return GlueFloor([
        ("image, read once", N * C * H * W * e),
        ("encoder tokens written (N, 1+K, D)", N * (1 + K) * D * e),
        ("decoder-embedded latent read (N, 1+K, Dd)", N * (1 + K) * Dd * e),
        ("decoder tokens written (N, 1+L, Dd)", N * (1 + L) * Dd * e),
        ("pred read (N, L, P)", N * L * P * e),
        ("grad pred written (N, L, P)", N * L * P * e),
        ("grad decoder tokens read (N, 1+L, Dd)", N * (1 + L) * Dd * e),
        ("grad latent written (N, 1+K, Dd)", N * (1 + K) * Dd * e),
        ("grad encoder tokens read (N, 1+K, D)", N * (1 + K) * D * e),
    ])


# ---- the roofline estimate -------------------------------------------------------------------

@dataclass(frozen=True)
class Roofline:
    """An *estimate* of GPU time from the counts, not a measurement. Per op:
    time = max(FLOPs / (peak x flop_eff), bytes / (bandwidth x bw_eff)) + launch_s x launches,
    summed over the step. Defaults: H100 SXM, 989 TFLOP/s dense bf16, 3.35 TB/s HBM3."""
    peak_flops: float = 989e12
    bandwidth: float = 3.35e12
    flop_eff: float = 0.7
    bw_eff: float = 0.8
    launch_s: float = 4e-6

    def op_time(self, r: OpRecord) -> float:
        return (max(r.flops / (self.peak_flops * self.flop_eff), r.bytes / (self.bandwidth * self.bw_eff))
                + self.launch_s * r.launches)

    def describe(self) -> str:
        return (f"per op max(FLOPs / ({self.peak_flops / 1e12:.0f} TFLOP/s x {self.flop_eff}), "
                f"bytes / ({self.bandwidth / 1e12:.2f} TB/s x {self.bw_eff})) + "
                f"{self.launch_s * 1e6:.0f} us x launches")


H100 = Roofline()

# op kinds for the time breakdown
_GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution",
         "aten::convolution_backward", "mae_fast::patch_embed_gemm")

# the opt-in MLP GEMMs (MAE_FAST_MLP=gemm), epilogues included
MLP_GEMM_OPS = ("mae_fast::mlp_fc1_gelu", "mae_fast::mlp_fc2", "mae_fast::mlp_fc2_gelu_grad",
                "mae_fast::linear_weight_grad", "mae_fast::linear_residual")


def op_kind(r: OpRecord) -> str:
    op = r.op
    if r.phase == "optim":
        return "optimizer"
    if "flash" in op:
        return "attention kernel"
    if op.startswith(_GEMM) or op in ("mae_fast::patch_embed_gemm_backward", *MLP_GEMM_OPS):
        return "GEMM"
    if op.startswith("mae_fast::add_layer_norm"):  # the fused residual add + LayerNorm
        return "LayerNorm"
    if op.startswith("mae_fast::"):
        return "mae_fast glue ops"
    if "layer_norm" in op:
        return "LayerNorm"
    if op.startswith(("aten::sum", "aten::mean", "aten::amax", "aten::aminmax", "aten::max", "aten::min",
                      "aten::var", "aten::all", "aten::any", "aten::sort")):
        return "reductions"
    if op.startswith(("aten::copy_", "aten::clone", "aten::_to_copy", "aten::stack", "aten::cat",
                      "aten::gather", "aten::scatter", "aten::repeat", "aten::index", "aten::new_zeros",
                      "aten::zeros", "aten::fill_", "aten::zero_", "aten::constant_pad_nd")):
        return "copies / gathers"
    return "elementwise"


KINDS = ("GEMM", "attention kernel", "elementwise", "LayerNorm", "reductions", "copies / gathers",
         "mae_fast glue ops", "optimizer")


@dataclass
class StepEstimate:
    time_s: float
    launch_s: float
    by_kind: Dict[str, float]
    flops: int
    bytes: int
    launches: int


def estimate(counter: TrafficCounter, model: Roofline = H100) -> StepEstimate:
    by_kind: Dict[str, float] = defaultdict(float)
    launch = 0.0
    for r in counter.log:
        t = model.op_time(r)
        by_kind[op_kind(r)] += t - model.launch_s * r.launches
        launch += model.launch_s * r.launches
    total = counter.total()
    return StepEstimate(sum(by_kind.values()) + launch, launch, dict(by_kind), total.flops,
                        total.bytes, sum(r.launches for r in counter.log))


# ---- the tables -------------------------------------------------------------------------------

def measure(arch, batch: int, dtype, fast_backend: str = "fast", mask_ratio: float = 0.75,
            keep_log: bool = True, optimizer: str = "none", hf: bool = False, **model_kwargs):
    """{path name: counter} for mae_fast (``fast_backend``), the official sequence and (with
    ``hf=True``) HF ViTMAE; ``dtype`` is a torch dtype or a PRECISIONS name."""
    model_dtype, precision = _model_dtype(dtype)
    precision = "amp-bf16" if precision == "amp-bf16" else "bf16"
    results = {}
    for name, backend in (("mae_fast", fast_backend), ("official op sequence", "reference")):
        mae = build_meta_model(arch, backend, model_dtype, **model_kwargs)
        results[name] = count_step(mae, batch, mask_ratio, keep_log=keep_log, optimizer=optimizer,
                                   precision=precision)
    ref = build_meta_model(arch, "reference", model_dtype, **model_kwargs)
    if hf:
        results["HF ViTMAE (sdpa)"] = count_hf_step(build_meta_hf(ref, model_dtype, mask_ratio), batch,
                                                    keep_log=keep_log, optimizer=optimizer,
                                                    precision=precision)
    floor = glue_floor(build_meta_model(arch, "reference", DTYPES["bf16"] if precision == "amp-bf16"
                                        else model_dtype, **model_kwargs), batch, mask_ratio)
    return results, floor


def _gib(b: int) -> str:
    return f"{b / GIB:.3f}"


def _arch_name(arch) -> str:
    return arch if isinstance(arch, str) else getattr(arch, "__name__", "custom")


def uint8_image_bytes(arch, batch: int = 256, precision: str = "amp-bf16", fast_backend: str = "fast",
                      mask_ratio: float = 0.75) -> Dict[str, Dict[str, int]]:
    """Counted bytes (forward + backward, on meta) of the regions that read the image, mae_fast's
    fused path: {"float" | "uint8": {"encoder input": B, "loss": B}}. "float" is the image the
    step takes today (fp32 under amp-bf16, else the model's dtype), "uint8" the same pixels as
    uint8 with the normalisation fused into the kernels' reads."""
    model_dtype, _ = _model_dtype(precision)
    out = {}
    for name, uint8 in (("float", False), ("uint8", True)):
        mae = build_meta_model(arch, fast_backend, model_dtype)
        counter = count_step(mae, batch, mask_ratio, keep_log=False, precision=precision,
                             uint8_images=uint8)
        out[name] = {region: counter.total(regions=(region,)).bytes
                     for region in ("encoder input", "loss")}
    return out


def uint8_image_table(arch, batch: int = 256, precision: str = "amp-bf16", fast_backend: str = "fast",
                      mask_ratio: float = 0.75) -> str:
    counts = uint8_image_bytes(arch, batch, precision, fast_backend, mask_ratio)
    f, u = counts["float"], counts["uint8"]
    img = "fp32" if precision == "amp-bf16" else precision
    lines = [f"#### {_arch_name(arch)}, batch {batch}, {precision}: counted bytes (MiB) of the regions "
             f"that read the image, forward + backward, {img} vs uint8 images",
             "", f"| region | {img} images | uint8 images | saved |", "|---|---|---|---|"]
    for region in ("encoder input", "loss"):
        lines.append(f"| {region} | {f[region] / 2**20:.1f} | {u[region] / 2**20:.1f} "
                     f"| {(f[region] - u[region]) / 2**20:.1f} |")
    tf, tu = sum(f.values()), sum(u.values())
    lines.append(f"| both | {tf / 2**20:.1f} | {tu / 2**20:.1f} | {(tf - tu) / 2**20:.1f} |")
    return "\n".join(lines)


def table(arch, batch: int, dtype_name: str, fast_backend: str = "fast",
          mask_ratio: float = 0.75, optimizer: str = "none", **model_kwargs) -> str:
    results, floor = measure(arch, batch, dtype_name if dtype_name in PRECISIONS else DTYPES[dtype_name],
                             fast_backend, mask_ratio, optimizer=optimizer, **model_kwargs)
    fast, off = results["mae_fast"], results["official op sequence"]
    what = "forward + backward" + ("" if optimizer == "none" else f" + AdamW ({optimizer})")
    lines = [f"### {_arch_name(arch)}, batch {batch}, {dtype_name}, mask ratio {mask_ratio}, {what}",
             "",
             "| region | mae_fast GiB | mae_fast launches | official GiB | official launches | bytes ratio | launches ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def row(label, regions):
        f, o = fast.total(regions), off.total(regions)
        br = f"{o.bytes / f.bytes:.2f}x" if f.bytes else "-"
        opr = f"{o.ops / f.ops:.2f}x" if f.ops else "-"
        lines.append(f"| {label} | {_gib(f.bytes)} | {f.ops} | {_gib(o.bytes)} | {o.ops} | {br} | {opr} |")

    for r in GLUE:
        row(f"glue: {r}", (r,))
    row("**glue total**", GLUE)
    row("attention", ("attention",))
    row("rest", ("rest",))
    if optimizer != "none":
        row("optimizer", ("optimizer",))
    row("**step total**", REGIONS)
    lines.append("")
    fg = fast.total(GLUE)
    lines.append(f"Glue floor (analytic): {_gib(floor.bytes)} GiB = "
                 + " + ".join(f"{name} {b / GIB:.4f}" for name, b in floor.terms) + ".")
    lines.append(f"mae_fast glue / floor: {fg.bytes / floor.bytes:.2f}x; "
                 f"official glue / floor: {off.total(GLUE).bytes / floor.bytes:.2f}x.")
    return "\n".join(lines)


def roofline_table(arch, batch: int, precision: str, fast_backend: str = "fast",
                   mask_ratio: float = 0.75, optimizer: str = "fused", model: Roofline = H100,
                   **model_kwargs) -> str:
    """The three contenders' whole step (fwd + bwd + AdamW): bytes, launches, FLOPs and the
    roofline estimate with its breakdown by op kind."""
    results, _ = measure(arch, batch, precision, fast_backend, mask_ratio, optimizer=optimizer,
                         hf=True, **model_kwargs)
    est = {name: estimate(c, model) for name, c in results.items()}
    names = list(results)
    lines = [f"### {_arch_name(arch)}, batch {batch}, {precision}, mask ratio {mask_ratio}, "
             f"forward + backward + AdamW ({optimizer}): roofline ESTIMATE (not a measurement)",
             "",
             "| | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(n) for n in names) + " |")

    row("GiB moved", lambda n: _gib(est[n].bytes))
    row("kernel launches", lambda n: str(est[n].launches))
    row("TFLOP", lambda n: f"{est[n].flops / 1e12:.3f}")
    row("attention region GiB (mae_fast, official: qkv projection + attention; HF: its SDPA call)",
        lambda n: _gib(results[n].total(("attention",)).bytes))
    row("**modeled step, ms (estimate)**", lambda n: f"**{est[n].time_s * 1e3:.1f}**")
    for kind in KINDS:
        row(f"  {kind}, ms", lambda n, k=kind: f"{est[n].by_kind.get(k, 0.0) * 1e3:.1f}")
    row("  launch overhead, ms", lambda n: f"{est[n].launch_s * 1e3:.1f}")
    fast = est["mae_fast"].time_s
    row("modeled speed-up of mae_fast over it", lambda n: f"{est[n].time_s / fast:.2f}x")
    lines.append("")
    lines.append(f"Model: {model.describe()}.")
    return "\n".join(lines)


def top_ops(counter: TrafficCounter, n: int = 20, model: Roofline = H100) -> str:
    """The ``n`` (phase, op) groups with the most modeled time: where the step goes."""
    groups: Dict[Tuple[str, str], List[float]] = defaultdict(lambda: [0.0, 0, 0])
    for r in counter.log:
        g = groups[(r.phase, r.op)]
        g[0] += model.op_time(r)
        g[1] += r.launches
        g[2] += r.bytes
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:n]
    lines = ["| phase | op | modeled ms (estimate) | launches | GiB |", "|---|---|---:|---:|---:|"]
    lines += [f"| {phase} | `{op}` | {t * 1e3:.2f} | {k} | {b / GIB:.2f} |" for (phase, op), (t, k, b) in rows]
    return "\n".join(lines)


def glue_ops_listing(counter: TrafficCounter) -> str:
    rows = [f"{r.phase} {r.region:14s} {r.op:48s} {(r.read + r.written) / 2**20:10.2f} MiB"
            f"{'' if r.launches == 1 else f' ({r.launches} launches)'}"
            for r in counter.log if r.region in GLUE]
    return "\n".join(rows)


def ops_listing(counter: TrafficCounter, regions=REGIONS, phases=PHASES) -> str:
    rows = [f"{r.phase:5s} {r.region:14s} {r.op:52s} {r.bytes / 2**20:10.2f} MiB {r.launches:3d} "
            f"{r.flops / 1e9:10.2f} GFLOP" for r in counter.log if r.region in regions and r.phase in phases]
    return "\n".join(rows)



# ---- what a Triton kernel really loads and stores (the interpreter, for tests) ----------------

@dataclass
class KernelLaunch:
    """One interpreted Triton launch: distinct bytes loaded / stored (each address once, the
    rule the charges follow) and all bytes requested (re-reads included)."""
    kernel: str
    loaded: int = 0
    stored: int = 0
    loaded_requests: int = 0
    stored_requests: int = 0


class InterpretedTraffic:
    """``with InterpretedTraffic() as probe:`` around code that launches Triton kernels under
    ``TRITON_INTERPRET=1`` records, per launch, the bytes its ``tl.load`` / ``tl.store`` really
    touch (masked-off lanes excluded), and counts the torch ops run outside the kernels (their
    tensor-level bytes, e.g. a ``zero_`` fill) with a ``TrafficCounter`` (``probe.torch_ops``).
    Only for tests: it wraps the interpreter's builder."""

    def __init__(self):
        self.launches: List[KernelLaunch] = []
        self.torch_ops = TrafficCounter()
        self._current: Optional[KernelLaunch] = None
        self._addresses: Dict[str, list] = {}

    def _record(self, kind: str, ptrs, mask) -> None:
        import numpy as np
        if self._current is None:
            return
        addrs = np.asarray(ptrs.data)
        keep = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        chosen = addrs[keep].astype(np.uint64).ravel()
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        self._addresses[kind].append((chosen, size))
        if kind == "load":
            self._current.loaded_requests += chosen.size * size
        else:
            self._current.stored_requests += chosen.size * size

    def _close_launch(self) -> None:
        import numpy as np
        for kind in ("load", "store"):
            total = 0
            by_size: Dict[int, list] = defaultdict(list)
            for addrs, size in self._addresses[kind]:
                by_size[size].append(addrs)
            for size, arrays in by_size.items():
                total += int(np.unique(np.concatenate(arrays)).size) * size
            if kind == "load":
                self._current.loaded = total
            else:
                self._current.stored = total
        self.launches.append(self._current)
        self._current = None

    @contextlib.contextmanager
    def _patches(self):
        from triton.runtime import interpreter as interp
        probe = self
        builder = interp.InterpreterBuilder
        grid = interp.GridExecutor
        masked_load, masked_store, call = (builder.create_masked_load, builder.create_masked_store,
                                           grid.__call__)

        def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
            probe._record("load", ptrs, mask)
            return masked_load(self, ptrs, mask, other, *args, **kwargs)

        def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
            probe._record("store", ptrs, mask)
            return masked_store(self, ptrs, value, mask, *args, **kwargs)

        def launch(self, *args, **kwargs):
            probe._current = KernelLaunch(getattr(self.fn, "__name__", "?"))
            probe._addresses = {"load": [], "store": []}
            with probe.torch_ops.paused():  # the interpreter's own host copies are no kernel
                result = call(self, *args, **kwargs)
            probe._close_launch()
            return result

        builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
        grid.__call__ = launch
        try:
            yield
        finally:
            builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
            grid.__call__ = call

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._patches())
        self._stack.enter_context(self.torch_ops)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def total(self) -> Charge:
        """Triton launches + the torch ops around them, as one Charge."""
        ops = self.torch_ops.log
        return Charge(sum(k.loaded for k in self.launches) + sum(r.read for r in ops),
                      sum(k.stored for k in self.launches) + sum(r.written for r in ops),
                      len(self.launches) + sum(r.launches for r in ops))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mae_fast.accounting", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16"], help=f"of {sorted(MODELS)}")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="the byte table's dtype (everything in it)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--fast-backend", choices=("fast", "auto"), default="fast",
                    help="mae_fast's backend on meta (default fast: every fused op, or an error)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="fused",
                    help="the AdamW step counted after the backward (the same for every contender)")
    ap.add_argument("--list-glue-ops", action="store_true", help="print every glue op of both paths")
    ap.add_argument("--roofline", action="store_true",
                    help="the three contenders (needs transformers) with the roofline estimate")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                    help="for --roofline: pure bf16 and/or bf16 autocast with fp32 master weights")
    ap.add_argument("--uint8-images", action="store_true",
                    help="compare the image-reading regions' bytes for float vs uint8 images "
                         "(per --precision)")
    ap.add_argument("--top-ops", type=int, default=0, metavar="N",
                    help="for --roofline: also list mae_fast's N most expensive (phase, op) groups")
    ap.add_argument("--mlp", choices=("plain", "gemm"), default=None,
                    help="mae_fast's MLP: the default cuBLAS nn.Linear + nn.GELU(), or the opt-in Triton "
                         "GEMM epilogues (sets MAE_FAST_MLP; default: as the environment says)")
    args = ap.parse_args(argv)
    if args.mlp is not None:
        import os
        os.environ["MAE_FAST_MLP"] = args.mlp
    for arch in args.models:
        if args.uint8_images:
            for precision in args.precision:
                print(uint8_image_table(arch, args.batch, precision, args.fast_backend, args.mask_ratio))
                print()
            continue
        if args.roofline:
            for precision in args.precision:
                print(roofline_table(arch, args.batch, precision, args.fast_backend, args.mask_ratio,
                                     args.optimizer))
                print()
                if args.top_ops:
                    model_dtype, _ = _model_dtype(precision)
                    mae = build_meta_model(arch, args.fast_backend, model_dtype)
                    counter = count_step(mae, args.batch, args.mask_ratio, optimizer=args.optimizer,
                                         precision=precision)
                    print(f"#### mae_fast, {_arch_name(arch)} {precision}: the {args.top_ops} most "
                          f"expensive ops (roofline estimate)\n\n{top_ops(counter, args.top_ops)}\n")
            continue
        print(table(arch, args.batch, args.dtype, args.fast_backend, args.mask_ratio, args.optimizer))
        print()
        if args.list_glue_ops:
            results, _ = measure(arch, args.batch, DTYPES[args.dtype], args.fast_backend,
                                 args.mask_ratio, keep_log=True)
            for name, counter in results.items():
                print(f"#### glue ops, {name}\n```\n{glue_ops_listing(counter)}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
