"""nanowarp: WARP (Weight Averaged Rewarded Policies, Ramé et al. 2024) in small, readable PyTorch."""
