"""Large models on small memory: loading builds no random weights and reads each tensor once, in the
dtype asked for, shard by shard; a bf16 run holds no float32 copy of the weights no LoRA adapts;
gradient checkpointing gives the gradients of a plain backward pass."""

import os

import pytest
import torch
from safetensors.torch import load_file

from nanowarp import hub, models, rl, run_state
from nanowarp.config import parse_args
from nanowarp.lora import add_lora, lora_modules
from nanowarp.models.distilbert import DistilBertClassifier, DistilBertConfig
from nanowarp.models.gpt2 import CONV1D, GPT2, GPT2Classifier, GPT2ClassifierConfig, GPT2Config
from nanowarp.models.llama import Llama, LlamaClassifier
from nanowarp.models.llama_config import LlamaClassifierConfig, LlamaConfig
from nanowarp.reward import load_classifier

ARCH = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
GEMMA2 = dict(model_type="gemma2", head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
              norm_offset=True, embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=16,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"])
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
BUILD = {
    "gpt2": lambda: GPT2(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "llama": lambda: Llama(LlamaConfig(**ARCH)),
    "gemma2": lambda: Llama(LlamaConfig.from_hf({**ARCH, **GEMMA2})),
    "qwen2": lambda: Llama(LlamaConfig(**ARCH, model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)),
    "gpt2_classifier": lambda: GPT2Classifier(GPT2ClassifierConfig(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=4, id2label=LABELS)),
    "qwen2_classifier": lambda: LlamaClassifier(LlamaClassifierConfig(
        **ARCH, model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, id2label=LABELS)),
    "distilbert": lambda: DistilBertClassifier(DistilBertConfig(
        vocab_size=300, max_position_embeddings=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, id2label=LABELS)),
}
CLASSIFIERS = ("gpt2_classifier", "qwen2_classifier", "distilbert")


def random_model(family, seed=0):
    """A random model of a family nanowarp loads, every weight moved off its initial value (norms
    and biases too), so that a tensor loaded into the wrong place would show."""
    torch.manual_seed(seed)
    model = BUILD[family]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (folder of its random checkpoint, the model saved there)}"""
    out = {}
    for family in BUILD:
        folder = str(tmp_path_factory.mktemp(family))
        model = random_model(family)
        model.save_pretrained(folder)
        out[family] = folder, model.eval()
    return out


@pytest.fixture
def no_random_weights(monkeypatch):
    """Every random initialiser fails if it fills a tensor that has memory (a meta tensor has none)."""
    for name in ("normal_", "uniform_"):
        def fill(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            assert self.is_meta, f"a random weight was built: {_name} on a {tuple(self.shape)} tensor"
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, fill)


def load(family, folder, dtype=torch.float32):
    return (load_classifier(folder) if family in CLASSIFIERS else models.from_pretrained(folder, dtype)).eval()


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_the_no_random_weights_check_sees_a_random_build(no_random_weights):
    with pytest.raises(AssertionError, match="a random weight was built"):
        GPT2(GPT2Config(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))


@pytest.mark.parametrize("family", list(BUILD))
def test_loading_builds_no_random_weights_and_gives_the_files_tensors(family, checkpoints, no_random_weights):
    folder, saved = checkpoints[family]
    model = load(family, folder)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert_same_tensors(model.hf_state_dict(), load_file(os.path.join(folder, "model.safetensors")))
    assert all(p.is_contiguous() for p in model.parameters())
    head, embedding = getattr(model, "lm_head", None), model.get_submodule(
        "embeddings.word_embeddings" if family == "distilbert" else
        "transformer.wte" if family.startswith("gpt2") else "model.embed_tokens")
    if family in ("gpt2", "gpt2_classifier", "gemma2", "qwen2"):  # tied heads stay tied: one parameter
        assert head.weight is embedding.weight
    elif head is not None:
        assert head.weight.data_ptr() != embedding.weight.data_ptr()
    x = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(x), saved(x))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_loading_in_bf16_converts_each_tensor_of_the_file(family, checkpoints, no_random_weights):
    folder, _ = checkpoints[family]
    model = load(family, folder, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    on_file = load_file(os.path.join(folder, "model.safetensors"))
    assert_same_tensors(model.hf_state_dict(), {k: v.to(torch.bfloat16) for k, v in on_file.items()})
    if family != "gpt2":
        assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"  # computed, not loaded


def test_a_sharded_checkpoint_is_read_shard_by_shard(checkpoints, tmp_path, monkeypatch, no_random_weights):
    folder, saved = checkpoints["llama"]
    theta = saved.hf_state_dict()
    sharded = str(tmp_path / "sharded")
    hub.save_weights(sharded, saved.config.to_hf(), theta, max_shard_bytes=20_000)
    shards = [f for f in hub.weight_files(sharded) if hub.SHARD.fullmatch(f)]
    assert len(shards) > 2
    reads, read = [], hub.read_safetensors

    def spy(path, dtype=None, names=None):
        reads.append((os.path.basename(path), names))
        return read(path, dtype, names)
    monkeypatch.setattr(hub, "read_safetensors", spy)  # what hub.load_state_dict calls
    model = models.from_pretrained(sharded, torch.bfloat16)
    assert sorted(r[0] for r in reads) == shards  # each shard once, for the tensors the index puts there
    assert all(set(load_file(os.path.join(sharded, shard))) == names for shard, names in reads)
    assert_same_tensors(model.hf_state_dict(), {k: v.detach().to(torch.bfloat16) for k, v in theta.items()})


def test_reading_a_file_gives_each_tensor_its_own_memory(checkpoints):
    folder, _ = checkpoints["gpt2"]
    tensors = hub.read_safetensors(os.path.join(folder, "model.safetensors"))
    assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == len(tensors)  # no mapping of the file
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors.values())


def test_a_file_read_in_another_dtype_is_converted_piece_by_piece_as_to_would(tmp_path, monkeypatch):
    """read_safetensors(dtype=...) converts through a scratch buffer (memory.CONVERT_BYTES), never
    holding a whole tensor as stored: the same bits as reading it whole and `.to(dtype)`, whatever the
    pieces (here 7 float32 numbers, so that pieces end inside a row), and every other tensor as stored."""
    from safetensors.torch import save_file
    from nanowarp import memory
    g = torch.Generator().manual_seed(0)
    stored = {"w": torch.randn(13, 5, generator=g) * 1e3, "b": torch.randn(3, generator=g), "scalar": torch.tensor(2.5),
              "ids": torch.arange(10), "empty": torch.zeros(0, 4), "half": torch.randn(4, generator=g).half()}
    save_file(stored, str(tmp_path / "m.safetensors"))
    monkeypatch.setattr(memory, "CONVERT_BYTES", 28)
    read = hub.read_safetensors(str(tmp_path / "m.safetensors"), torch.bfloat16)
    for k, v in stored.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert read[k].dtype == want.dtype and read[k].shape == want.shape and torch.equal(read[k], want), k
    as_stored = hub.read_safetensors(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(as_stored[k], v) and as_stored[k].dtype == v.dtype for k, v in stored.items())


def test_a_tensor_type_nanowarp_does_not_read_is_named(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(hub.CheckpointError, match=r"cannot read .*model.safetensors.*'w' is stored as F8_E4M3"):
        hub.load_state_dict(str(tmp_path))


# ---- rl_run's models: no random weights, the same random stream, no float32 copy in bf16 --------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rl_models_are_built_from_theta_but_leave_the_random_stream_as_a_random_build(family, checkpoints):
    """The LoRA factors' initialisation (and LoRA dropout) must draw what they drew when rl_run built
    its models from random ones: the reproduction's weights depend on it."""
    _, saved = checkpoints[family]
    theta = {k: v.detach() for k, v in saved.hf_state_dict().items()}
    torch.manual_seed(5)  # what rl_run drew before: a random policy, its LoRA factors, a random anchor
    add_lora(models.from_config(saved.config), 2)
    models.from_config(saved.config)
    expected = torch.get_rng_state()
    torch.manual_seed(5)
    policy = add_lora(rl.build_policy(theta, saved.config, torch.device("cpu")), 2)
    anchor = rl.build_anchor(policy, saved.config)
    assert torch.equal(torch.get_rng_state(), expected)
    assert_same_tensors(anchor.hf_state_dict(), theta)  # and the anchor is θ
    assert not anchor.training and not any(p.requires_grad for p in anchor.parameters())


def stored(tensors):
    """{dtype: bytes} of the distinct storages behind the tensors."""
    seen, out = set(), {}
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out[t.dtype] = out.get(t.dtype, 0) + t.untyped_storage().nbytes()
    return out


@pytest.mark.parametrize("dtype,anchor", [("bfloat16", "ema"), ("float32", "ema"), ("bfloat16", "init")])
def test_the_anchor_shares_every_unadapted_weight_and_bf16_keeps_no_float32_copy(
        dtype, anchor, job_flags, tiny_gpt2_dir, monkeypatch):
    seen = {}
    build_anchor = rl.build_anchor

    def spy(policy, model_config, moving=True, master=None):
        seen.update(policy=policy, master=master, anchor=build_anchor(policy, model_config, moving, master))
        return seen["anchor"]
    monkeypatch.setattr(rl, "build_anchor", spy)
    cfg = parse_args(job_flags + ["--out_dir", "unused", "--dtype", dtype, "--steps", "1",
                                  "--lora_targets", "c_attn,c_fc", "--anchor", anchor])
    theta = models.load_theta(tiny_gpt2_dir)
    out = rl.rl_run(theta, 0, 0, cfg, rl.load_resources(cfg))
    policy, master, fixed = seen["policy"], seen["master"], anchor == "init"
    anchor = seen["anchor"]
    adapted = {f"{name}.weight" for name, _ in lora_modules(policy)}
    lora = [p for n, p in policy.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    for name, w in anchor.state_dict().items():  # one storage for every weight the EMA does not move
        same = w.data_ptr() == policy.state_dict()[name].data_ptr()
        assert same == (name not in adapted or dtype == "bfloat16" or fixed), name  # bf16: W0 shared too, δ apart
    held = stored([*policy.parameters(), *policy.buffers(), *anchor.parameters(), *anchor.buffers(),
                   *(master or {}).values()])
    n_weights = sum(v.numel() for v in theta.values())
    n_adapted = sum(anchor.get_submodule(k.removesuffix(".weight")).weight.numel() for k in adapted)
    n_lora = sum(p.numel() for p in lora)
    if dtype == "bfloat16":  # float32: the LoRA factors and the anchor's EMA master δ of the adapted matrices only
        assert held[torch.float32] == 4 * (n_lora + (0 if fixed else n_adapted)) < 4 * n_weights
        assert held[torch.bfloat16] == 2 * n_weights  # the policy's weights, which the anchor shares
        assert all(isinstance(anchor.get_submodule(k.removesuffix(".weight")), run_state.AnchorLinear) != fixed
                   for k in adapted)
        assert all(out[k].dtype == torch.float32 for k in out)
        assert all(torch.equal(out[k], theta[k]) for k in theta if k not in adapted)  # θ_init's own float32 values
    else:
        assert set(held) == {torch.float32}
        assert held[torch.float32] == 4 * (n_weights + n_adapted + n_lora)  # the policy, the anchor's own, LoRA
        # the policy takes θ_init's own tensors, where it needs no other layout (GPT-2's Conv1D: transposed)
        assert all(policy.state_dict()[k].data_ptr() == theta[k].data_ptr() for k in theta if not k.endswith(CONV1D))


# ---- gradient checkpointing ----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "distilbert"])
def test_gradient_checkpointing_gives_the_plain_gradients_and_recomputes_the_blocks(family):
    model = random_model(family)
    if family != "distilbert":  # LoRA with dropout, as in an RL update: its masks must be replayed
        model = add_lora(model, 4, dropout=0.1)
    model.train()
    blocks = model.transformer.layer if family == "distilbert" else \
        model.transformer.h if family == "gpt2" else model.model.layers
    calls = []
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randint(0, 300, (3, 11))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    grads = {}
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(1)  # the dropout masks
        out = model(x, mask)
        (out.float() ** 2).mean().backward()
        assert len(calls) == len(blocks) * (2 if checkpointing else 1)  # recomputed in the backward pass
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[False].keys() == grads[True].keys() and grads[False]
    worst = max((grads[False][n] - grads[True][n]).abs().max().item() for n in grads[False])
    print(f"\n{family}: max |Δ gradient| with checkpointing {worst:.1e}")
    assert worst <= 1e-6, worst
    calls.clear()
    with torch.no_grad():  # no gradient, nothing to recompute
        model(x, mask)
    assert len(calls) == len(blocks)
