"""The laptop study (reproduce.py): WARP on real IMDB reviews with tiny models trained from scratch.

Built on the library (nanowarp/*.py), never imported by it:

    tiny        the tiny architectures, the tokenizers trained on the reviews, the two settings
    stages      the pipeline's stages, recorded in OUT/stages.json so that a run resumes
    diagnose    what RL can learn: how the classifiers read short texts, each reward's gradient signal
    evaluation  every checkpoint, LITI sweep, LERP and best-of-N of a seed, in worker processes
    claims      the paper's claims checked on the rows, and the headline
    report      results.json, results.md and the Pareto plot
"""
