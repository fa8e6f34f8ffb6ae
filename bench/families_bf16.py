"""
bf16 logits of nanowarp's Llama-layout families against transformers' (docs/models.md quotes them).

For each family (llama, qwen2, mistral, gemma, gemma2), the tiny random model of the parity tests
(tests/test_llama.py: `reference`, its weights jittered so that no norm is 1 and no bias 0), its
left-padded batch and positions; nanowarp's Llama loads the checkpoint transformers saves. Both
are cast to bf16 and run one forward; on the real (not padding) positions the script prints the
largest absolute difference of the logits:

- ours vs transformers: nanowarp bf16 against transformers bf16;
- transformers vs fp32, ours vs fp32: each bf16 model against transformers in fp32, what bf16's
  rounding costs either of them.

The tests check fp32 to 1e-5; bf16 is not a test, since the two round differently in places.
Needs transformers and pytest (the `dev` extra). On a CPU, a few seconds:

    python bench/families_bf16.py
    python bench/families_bf16.py --families gemma,gemma2
"""

import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # run from anywhere; the parity tests' models
from nanowarp.config import flag, parse_args as parse_flags  # noqa: E402
from nanowarp.models.llama import Llama  # noqa: E402


@dataclass
class Args:
    families: str = flag("llama,qwen2,mistral,gemma,gemma2", "comma-separated families of tests/test_llama.py")
    threads: int = flag(1, "torch.set_num_threads; 0 keeps torch's default")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__, dashes=True)


@torch.no_grad()
def differences(family, folder):
    """(ours vs transformers in bf16, transformers bf16 vs fp32, ours bf16 vs fp32): the largest
    |Δ logit| over the real positions of the parity tests' left-padded batch."""
    import test_llama as T
    idx, mask = T.left_padded_batch()
    ref = T.reference(family)
    ours = Llama.from_pretrained(T.saved(ref, folder)).eval()
    fp32 = ref(idx, attention_mask=mask, position_ids=T.positions(mask)).logits
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    theirs = ref(idx, attention_mask=mask, position_ids=T.positions(mask)).logits.float()
    mine = ours(idx, mask).float()
    real = mask.bool()
    return tuple((a - b)[real].abs().max().item() for a, b in ((mine, theirs), (theirs, fp32), (mine, fp32)))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
    print(f"{time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, transformers {transformers.__version__}")
    print("largest |Δ logit| over the real positions, bf16")
    print(f"{'family':8s} {'ours vs transformers':>21s} {'transformers vs fp32':>21s} {'ours vs fp32':>13s}")
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as folder:
            d = differences(family, folder)
        print(f"{family:8s} {d[0]:21.4f} {d[1]:21.4f} {d[2]:13.4f}")


if __name__ == "__main__":
    main()
