"""The Llama-layout families through the whole pipeline: models.from_pretrained, sharded
checkpoints both ways, WARP jobs with a Llama policy and a Qwen2 reward model or a Gemma 2 policy
(resumed after a kill, merged by merge.py), and LoRA on chosen layers."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import merge
import train
from conftest import Killed, assert_same_weights, chat_checkpoint, in_process, stop_at
from nanowarp import checksums, hub, models
from nanowarp.config import parse_args
from nanowarp.lora import add_lora, lora_modules, named_targets
from nanowarp.models.gpt2 import GPT2
from nanowarp.models.llama import Llama, LlamaClassifier
from nanowarp.models.llama_config import LlamaClassifierConfig, LlamaConfig
from nanowarp.tokenizer import EOS
from nanowarp.warp import warp

ARCH = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
GEMMA2 = dict(model_type="gemma2", head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
              norm_offset=True, embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=16,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"])


def checkpoint(folder, model, bpe_dir, generation_config=None):
    """model saved in the Hugging Face layout with the fixture tokenizer (and a generation_config.json)."""
    shutil.copytree(bpe_dir, folder, dirs_exist_ok=True)
    model.save_pretrained(folder)
    if generation_config is not None:
        hub.write_json(os.path.join(folder, "generation_config.json"), generation_config)
    return folder


def eos_of(bpe_dir):
    return json.load(open(os.path.join(bpe_dir, "vocab.json")))[EOS]


def policy(bpe_dir, seed=0, **kw):
    eos = eos_of(bpe_dir)
    torch.manual_seed(seed)
    vocab = len(json.load(open(os.path.join(bpe_dir, "vocab.json"))))
    return Llama(LlamaConfig(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, **{**ARCH, **kw}))


@pytest.fixture(scope="module")
def llama_dir(bpe_dir, tmp_path_factory):
    """A random Llama (GQA, untied head) whose generation_config.json stops at EOS or at '.'."""
    stop = json.load(open(os.path.join(bpe_dir, "vocab.json")))["."]
    return checkpoint(str(tmp_path_factory.mktemp("llama")), policy(bpe_dir), bpe_dir,
                      {"eos_token_id": [eos_of(bpe_dir), stop]})


@pytest.fixture(scope="module")
def gemma2_dir(bpe_dir, tmp_path_factory):
    return checkpoint(str(tmp_path_factory.mktemp("gemma2")), policy(bpe_dir, **GEMMA2), bpe_dir)


@pytest.fixture(scope="module")
def qwen2_reward_dir(bpe_dir, tmp_path_factory):
    """A random Qwen2 sequence classifier (NEGATIVE, POSITIVE) over the fixture BPE."""
    eos = eos_of(bpe_dir)
    torch.manual_seed(1)
    vocab = len(json.load(open(os.path.join(bpe_dir, "vocab.json"))))
    config = LlamaClassifierConfig(model_type="qwen2", vocab_size=vocab,
                                   qkv_bias=True, tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos,
                                   id2label={0: "NEGATIVE", 1: "POSITIVE"}, **{**ARCH, "num_hidden_layers": 1})
    return checkpoint(str(tmp_path_factory.mktemp("qwen2_rm")), LlamaClassifier(config), bpe_dir)


def flags(policy_dir, reward_dir, data, out, *extra):
    return ["--policy", policy_dir, "--reward_model", reward_dir, "--data", data, "--iterations", "2", "--runs", "2",
            "--steps", "2", "--batch_size", "4", "--max_new_tokens", "6", "--lora_rank", "2", "--warmup", "1",
            "--lr", "1e-2", "--device", "cpu", "--threads", "1", "--out_dir", out, *extra]


def test_from_pretrained_picks_the_class_by_model_type(llama_dir, gemma2_dir, tiny_gpt2_dir, qwen2_reward_dir):
    assert type(models.from_pretrained(llama_dir)) is Llama and type(models.from_pretrained(tiny_gpt2_dir)) is GPT2
    assert models.from_pretrained(gemma2_dir).config.final_logit_softcapping == 30.0
    from nanowarp.reward import load_classifier
    assert type(load_classifier(qwen2_reward_dir)) is LlamaClassifier
    assert models.eos_ids(llama_dir, models.load_config(llama_dir)) == json.load(
        open(os.path.join(llama_dir, "generation_config.json")))["eos_token_id"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sharded_checkpoints_load_and_save(family, tiny_gpt2_dir, llama_dir, tmp_path):
    source = tiny_gpt2_dir if family == "gpt2" else llama_dir
    model = models.from_pretrained(source).eval()
    theta = model.hf_state_dict()
    folder = str(tmp_path / "sharded")
    models.save_policy(folder, theta, model.config, source, card="# card\n", max_shard_bytes=20_000)
    files = hub.weight_files(folder)
    assert hub.INDEX in files and len(files) > 3 and "model.safetensors" not in files
    with open(os.path.join(folder, hub.INDEX)) as f:
        assert set(json.load(f)["weight_map"]) == set(theta)
    assert os.path.isfile(os.path.join(folder, "README.md")) and os.path.isfile(os.path.join(folder, "vocab.json"))
    back = models.from_pretrained(folder).eval()
    idx = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))
    hub.check_readable(folder)
    shards = [f for f in files if hub.SHARD.fullmatch(f)]
    assert set(files) <= checksums.read(folder).keys()  # the index and every shard
    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    os.remove(os.path.join(broken, checksums.NAME))  # as from the Hub: the loaders' own checks (with it, any
    # changed or missing file is named first: tests/test_checksums.py)
    with open(os.path.join(broken, shards[-1]), "r+b") as f:  # a shard cut short
        f.truncate(os.path.getsize(os.path.join(folder, shards[-1])) // 2)
    with pytest.raises(hub.CheckpointError, match=f"cannot read .*{shards[-1]}"):
        hub.check_readable(broken)
    os.remove(os.path.join(broken, shards[0]))
    with pytest.raises(hub.CheckpointError, match=f"names the shard {shards[0]}"):
        models.from_pretrained(broken)
    models.save_policy(folder, theta, model.config, source)  # one file again: the shards go
    assert hub.weight_files(folder) == ["model.safetensors"]
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    ref.save_pretrained(str(tmp_path / "hf"), max_shard_size="20KB")  # transformers' own shards
    assert os.path.isfile(tmp_path / "hf" / hub.INDEX)
    with torch.no_grad():
        ours = models.from_pretrained(str(tmp_path / "hf"))(idx)
        torch.testing.assert_close(ours, ref(idx).logits, rtol=0, atol=1e-5)


def test_lora_targets_pick_layers_by_name(llama_dir, tiny_reward_dir, prepared_imdb_dir, tmp_path, capsys):
    model = models.from_pretrained(llama_dir)
    assert len(named_targets(model, "all")) == 2 * 7
    chosen = named_targets(model, "q_proj,v_proj")
    assert [n.rpartition(".")[2] for n in chosen] == ["q_proj", "v_proj"] * 2
    add_lora(model, 2, targets=chosen)
    assert [n for n, _ in lora_modules(model)] == chosen
    with pytest.raises(ValueError, match="c_attn.*down_proj"):
        named_targets(models.from_pretrained(llama_dir), "c_attn")
    out = str(tmp_path / "out")  # train.py refuses it before writing anything
    assert train.main(flags(llama_dir, tiny_reward_dir, prepared_imdb_dir, out, "--lora_targets", "q_proj,c_fc")) == 2
    assert "--lora_targets c_fc" in capsys.readouterr().err and not os.path.exists(out)


@pytest.fixture(scope="module")
def llama_job(llama_dir, qwen2_reward_dir, prepared_imdb_dir, tmp_path_factory):
    """(job folder, final θ) of a WARP job with the Llama policy and the Qwen2 reward model."""
    out = str(tmp_path_factory.mktemp("llama_job"))
    return out, in_process(warp, parse_args(flags(llama_dir, qwen2_reward_dir, prepared_imdb_dir, out)), None,
                           lambda *a: None)


def test_llama_policy_with_a_qwen2_reward_resumes_and_merges(llama_job, llama_dir, qwen2_reward_dir, prepared_imdb_dir,
                                                             tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    whole, theta = llama_job
    sft = models.load_theta(llama_dir)
    assert set(theta) == set(sft) and "lm_head.weight" in theta  # untied: the head is a tensor of its own
    assert any(not torch.equal(theta[k], sft[k]) for k in theta), "the job must move the weights"
    assert os.path.isfile(os.path.join(whole, "iter_2", "liti", "generation_config.json"))
    # killed inside run 1 of iteration 2, resumed from its state: the same weights
    stop_at(monkeypatch, "iter_2/run_1/step_2")
    cfg = parse_args(flags(llama_dir, qwen2_reward_dir, prepared_imdb_dir, str(tmp_path / "killed"), "--save_every", "1"))
    with pytest.raises(Killed):
        in_process(warp, cfg, None, lambda *a: None)
    lines = []
    assert_same_weights(in_process(warp, cfg, None, lines.append), theta)
    assert "iter 2 run 2: resuming at step 1" in "\n".join(lines)
    # merge.py on the job's runs gives the job's own SLERP
    out = str(tmp_path / "merged")
    merge.main(["--init", os.path.join(whole, "iter_1", "liti"), "--policies",
                *(os.path.join(whole, "iter_2", f"run_{m}") for m in range(2)), "--out", out])
    assert_same_weights(load_file(os.path.join(out, "model.safetensors")),
                        load_file(os.path.join(whole, "iter_2", "slerp", "model.safetensors")))
    with pytest.raises(SystemExit):  # a GPT-2 and a Llama do not merge
        merge.main(["--init", tiny_gpt2_dir, "--policies", os.path.join(whole, "iter_2", "run_0"), "--out", out + "2"])
    assert "a gpt2 one: merge only checkpoints of the same architecture" in capsys.readouterr().err
    assert not os.path.exists(out + "2")


def test_eval_and_sample_read_the_llama_job(llama_job, llama_dir, qwen2_reward_dir, prepared_imdb_dir, tmp_path,
                                            capsys):
    """eval.py with the stop-id list, a held-out NLL, a LITI sweep and best-of-N; sample.py side by side."""
    import eval as eval_cli
    import sample as sample_cli
    whole, _ = llama_job
    liti = os.path.join(whole, "iter_2", "liti")
    out = tmp_path / "results.json"
    in_process(eval_cli.main, ["--models", liti, "--ref", llama_dir, "--reward_model", qwen2_reward_dir, "--data",
                               prepared_imdb_dir, "--n_prompts", "2", "--max_new_tokens", "6", "--heldout", "2",
                               "--sweep", llama_dir, liti, "--etas", "0.5", "--best_of", "2", "--device", "cpu",
                               "--out", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 3 and all(r["kl_exact"] >= 0 for r in rows if "kl_exact" in r)
    assert all(r["heldout_nll"] > 0 for r in rows if "heldout_nll" in r)
    capsys.readouterr()  # eval.py's lines
    in_process(sample_cli.main, ["--model", llama_dir, liti, "--prompt", "This movie was", "--num_samples", "2",
                                 "--max_new_tokens", "6", "--json"])
    result = json.loads(capsys.readouterr().out)
    samples = [c for m in result["prompts"][0]["models"] for c in m["samples"]]
    assert len(samples) == 4 and all(c["finished"] or c["length"] == 6 for c in samples)


def test_gemma2_policy_bf16_job_runs_and_merges(gemma2_dir, tiny_reward_dir, prepared_imdb_dir, tmp_path):
    """train.py with a Gemma 2 policy in bf16, LoRA on the attention alone."""
    out = str(tmp_path / "job")
    assert in_process(train.main, flags(gemma2_dir, tiny_reward_dir, prepared_imdb_dir, out, "--dtype", "bfloat16",
                                        "--lora_targets", "q_proj,k_proj,v_proj,o_proj")) == 0
    theta = models.load_theta(os.path.join(out, "iter_2", "liti"))
    assert all(v.dtype == torch.float32 for v in theta.values())
    sft = models.load_theta(gemma2_dir)
    moved = {k for k in theta if not torch.equal(theta[k], sft[k])}
    assert moved and all(k.endswith(tuple(f"{n}_proj.weight" for n in "qkvo")) for k in moved)
    assert "lm_head.weight" not in theta  # tied to the embeddings
    merged = str(tmp_path / "merged")
    merge.main(["--init", gemma2_dir, "--policies", *(os.path.join(out, "iter_1", f"run_{m}") for m in range(2)),
                "--out", merged, "--eta", "0.5"])  # iteration 1's SLERP and LITI (η = 0.5) again
    assert_same_weights(models.load_theta(merged), models.load_theta(os.path.join(out, "iter_1", "liti")))



def test_sft_and_reward_stages_train_llama_layout_models(gemma2_dir, llama_dir, prepared_imdb_dir, tmp_path):
    """train.py --stage sft on a Gemma 2 (LoRA on the MLP), --stage reward from a Llama language model:
    checkpoints of their own layout, which the loaders read back."""
    common = ["--data", prepared_imdb_dir, "--epochs", "0.5", "--train_batch_size", "4", "--max_length", "24",
              "--test_limit", "2", "--device", "cpu", "--threads", "1"]
    sft = str(tmp_path / "sft")
    assert in_process(train.main, ["--stage", "sft", "--policy", gemma2_dir, "--out_dir", sft, "--lora_rank", "2",
                                   "--lora_targets", "gate_proj,up_proj,down_proj", *common]) == 0
    before, after = models.load_theta(gemma2_dir), models.load_theta(os.path.join(sft, "sft"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) for k in moved)
    rm = str(tmp_path / "rm")
    with pytest.warns(UserWarning, match="no classifier head"):  # a language model: a fresh head
        assert in_process(train.main, ["--stage", "reward", "--reward_base", llama_dir, "--out_dir", rm, *common]) == 0
    from nanowarp.reward import RewardModel
    reward = RewardModel(os.path.join(rm, "reward_model"))
    assert type(reward.model) is LlamaClassifier and reward.model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert reward.score(["A great film.", "Dull."]).shape == (2,)

# ---- --chat_template ---------------------------------------------------------------------------
# ChatML with a BOS, a check that raises, loop controls: what real templates use
CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role') }}{% endif %}{% if loop.index > 8 %}{% break %}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(llama_dir, tmp_path_factory):
    """The Llama checkpoint with a chat template in its tokenizer_config.json."""
    return chat_checkpoint(llama_dir, str(tmp_path_factory.mktemp("chat")), CHATML)


def test_chat_template_renders_as_transformers_does(chat_dir, tiny_reward_dir, prepared_imdb_dir, tmp_path):
    from nanowarp.chat import chat_prompts, compile_template, load_template, render
    from nanowarp.rl import load_resources
    from nanowarp.tokenizer import load_tokenizer
    transformers = pytest.importorskip("transformers")
    folder = str(tmp_path / "tok")  # transformers reads the tokenizer from tokenizer.json
    shutil.copytree(chat_dir, folder)
    load_tokenizer(chat_dir).save(os.path.join(folder, "tokenizer.json"))
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    template, special = load_template(chat_dir)
    for text in ("This movie was ", "Émile's “favorite” scene 🎬"):
        expected = reference.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        assert render(compile_template(template), special, text) == expected
    cfg = parse_args(flags(chat_dir, tiny_reward_dir, prepared_imdb_dir, str(tmp_path / "x"), "--chat_template"))
    resources = load_resources(cfg)
    tokenizer = load_tokenizer(chat_dir)
    plain = load_resources(parse_args(flags(chat_dir, tiny_reward_dir, prepared_imdb_dir, str(tmp_path / "x")))).prompts
    assert resources.prompts == chat_prompts(plain, tokenizer, chat_dir)
    assert tokenizer.decode(resources.prompts[0]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_without_jinja2_or_without_a_template_is_a_clear_error(chat_dir, llama_dir, tiny_reward_dir,
                                                                            prepared_imdb_dir, tmp_path, monkeypatch,
                                                                            capsys):
    import sys
    out = str(tmp_path / "out")
    assert train.main(flags(llama_dir, tiny_reward_dir, prepared_imdb_dir, out, "--chat_template")) == 2
    assert "has no chat template" in capsys.readouterr().err and not os.path.exists(out)
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if not installed
    assert train.main(flags(chat_dir, tiny_reward_dir, prepared_imdb_dir, out, "--chat_template")) == 2
    assert "pip install jinja2" in capsys.readouterr().err and not os.path.exists(out)
