"""
Large models on small memory: building a model without memory, giving it a checkpoint's tensors
read once each, and recomputing activations instead of keeping them.

- `build_empty(build)`: a model on the meta device, no memory and no random values;
  `set_weights(model, state_dict, assign=True)` then makes the tensors its parameters, each
  converted and moved one at a time (what every from_pretrained and rl.build_policy do).
- `read_safetensors(path, dtype)`: each tensor of a file read into memory of its own, converted to
  dtype as it is read; safetensors' load_file maps the file instead, and every page read stays
  resident beside the copies a model makes of it.
- `run_block(model, block, *args)`: a transformer block, its activations recomputed in the backward
  pass when the model trains with `gradient_checkpointing` (--gradient_checkpointing).
"""

import json

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint


class _EmptyInit(TorchFunctionMode):
    """Random initialisers (torch.nn.init's, Tensor.normal_ / uniform_) do nothing to a meta tensor;
    with draws, each still draws its numbers, into a scratch CPU tensor dropped at once."""

    def __init__(self, draws):
        super().__init__()
        self.draws = draws

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        init = func in (torch.Tensor.normal_, torch.Tensor.uniform_) or getattr(func, "__module__", "") == "torch.nn.init"
        if not (init and isinstance(tensor, torch.Tensor) and tensor.is_meta):
            return func(*args, **kwargs)
        if self.draws:
            scratch = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            func(scratch, *args[1:], **kwargs) if args else func(**{**kwargs, "tensor": scratch})
        return tensor


def build_empty(build, draws=False):
    """build(), a model, on the meta device: no memory and no random values, for set_weights(...,
    assign=True) to give it a checkpoint's tensors (a meta tensor's normal_ would also cost a slow
    first call). draws: the random initialisers still make their draws, one scratch tensor at a
    time, so that the global random stream after it is the one a random build leaves."""
    with torch.device("meta"), _EmptyInit(draws):
        return build()


def set_weights(model, state_dict, assign=False, device=None, dtype=None):
    """Load weights under the model's own names and layouts; keys it lacks are left as they are (a
    tied head). assign=False: copied into the model's own tensors. assign=True: the model (built on
    the meta device: no memory, no random values) takes the tensors as its parameters, each moved
    to `device` and its floating point ones to `dtype` (when given) and made contiguous, one at a time:
    a copy only where that changes it (a CPU float32 tensor asked for as such is taken as it is)."""
    if assign:
        state_dict = {k: v.contiguous().to(device, dtype if v.is_floating_point() else None)
                      for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=assign)


# the tensor types of a safetensors header, as torch names them
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


# a tensor read in another dtype goes through one scratch buffer of this many bytes as stored: a bf16 load
# of a float32 file never holds a whole float32 tensor (Qwen2.5's embedding alone is 545 MB in float32)
CONVERT_BYTES = 16 * 2**20


def read_safetensors(path, dtype=None, names=None):
    """The tensors of a .safetensors file (those in `names`, when given), each read from the file into
    a tensor of its own: one copy, and no mapping of the file (safetensors' load_file maps it, and
    every page read stays resident beside the copies made from it). Floating-point tensors are
    converted to `dtype`, when given, CONVERT_BYTES at a time as they are read (the same rounding as
    `.to(dtype)`). The header is checked by safetensors first."""
    with safe_open(path, "pt") as f:  # a header that disagrees with the file's length fails here
        keys = [k for k in f.keys() if names is None or k in names]
    with open(path, "rb", buffering=0) as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        tensors, scratch = {}, None  # one scratch buffer for the file: one per tensor fragments the heap
        for name in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):  # in file order
            info = header[name]
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"'{name}' is stored as {info['dtype']}, a type nanowarp does not read")
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            convert = dtype is not None and stored.is_floating_point and dtype != stored
            t = torch.empty(info["shape"], dtype=dtype if convert else stored)
            start, end = info["data_offsets"]
            if end - start != t.numel() * stored.itemsize:
                raise ValueError(f"'{name}' ends before its bytes do")
            f.seek(8 + header_size + start)
            if not convert:
                _read_exactly(f, t.view(-1).view(torch.uint8), name)  # the tensor's own bytes (little-endian)
            else:
                scratch = torch.empty(max(CONVERT_BYTES, 8), dtype=torch.uint8) if scratch is None else scratch
                flat, step = t.view(-1), max(1, CONVERT_BYTES // stored.itemsize)
                for i in range(0, t.numel(), step):
                    raw = scratch[:min(step, t.numel() - i) * stored.itemsize]
                    _read_exactly(f, raw, name)
                    flat[i:i + raw.numel() // stored.itemsize].copy_(raw.view(stored))
            tensors[name] = t
    return {k: tensors[k] for k in keys}


def _read_exactly(f, t, name):
    """Fill the uint8 tensor t with the next bytes of the file f."""
    buffer = memoryview(t.numpy())
    if f.readinto(buffer) != len(buffer):
        raise ValueError(f"'{name}' ends before its bytes do")


def converted(state_dict, dtype):
    """The state dict with its floating-point tensors in `dtype` (None: as they are), one at a time."""
    if dtype is None:
        return state_dict
    for k, v in state_dict.items():
        state_dict[k] = v.to(dtype) if v.is_floating_point() else v
    return state_dict


def new_head(head, like, std=0.02):
    """A classifier head's fresh N(0, std²) weight (zero bias), on the device and in the dtype of
    `like`: drawn here when the model was built on the meta device, kept when it was built for real."""
    if head.weight.is_meta:
        head.to_empty(device=like.device)
        with torch.no_grad():
            nn.init.normal_(head.weight, mean=0.0, std=std)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
    head.to(like.dtype)


def run_block(model, block, *args):
    """block(*args). With model.gradient_checkpointing, while the model trains with gradients, the
    block's activations are not kept for the backward pass but recomputed there (the same values and
    gradients, with its dropout masks replayed from the saved random state): memory for one more
    forward of the block."""
    if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
