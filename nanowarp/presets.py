"""The presets of --preset: plain data, each a set of overrides of nanowarp.config.Config's defaults."""

PRESETS = {
    "reference": {},  # the reference reproduction on IMDB (SPEC §2)
    "rloo": {"rloo_k": 4},  # WARP + RLOO, 16 prompts x 4 completions
    # closer to the paper's Gemma setting, scaled to GPT-2: gentler LITI, lower temperature, more steps
    "paper": {"liti_rate": 0.3, "temperature": 0.9, "iterations": 5, "batch_size": 128, "warmup": 100,
              "steps": 1000},
    # the laptop-CPU reproduction (reproduce.py, nanowarp/study/tiny.py): tiny models, short runs, small LoRA.
    # mu = 1/60 keeps mu * T = 1 as in the reference (0.01 * 100): the EMA covers the same share of a run.
    "tiny": {"iterations": 3, "runs": 2, "steps": 60, "batch_size": 64, "max_new_tokens": 40, "lr": 1e-3,
             "warmup": 6, "lora_rank": 8, "lora_alpha": 8.0, "kl_coef": 0.1, "ema_rate": 1 / 60, "liti_rate": 0.5},
    # reproduce.py --setting sentiment: the tiny models with nothing left to learn but sentiment (60 new
    # tokens: the SFT model ends all its completions) and ten times the completions per run; RLOO k = 4,
    # a higher lr, and mu * T = 1 again. docs/reproduction.md#the-sentiment-setting has the measurements.
    "tiny_sentiment": {"iterations": 2, "runs": 2, "steps": 600, "batch_size": 64, "max_new_tokens": 60,
                       "rloo_k": 4, "lr": 3e-3, "warmup": 6, "lora_rank": 8, "lora_alpha": 8.0, "kl_coef": 0.1,
                       "ema_rate": 1 / 600, "liti_rate": 0.5},
}
