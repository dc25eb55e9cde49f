"""Analyses of trained models on a corpus's validation tokens: logit-lens KL to the final
distribution per layer (logit_lens), and validation loss split by the target token's training
frequency (freq). Each writes JSON + PNG; `romscale analyze ...` is the command line."""
