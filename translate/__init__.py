"""Use a trained translator: encode -> sample -> decode, evaluation, n2n-translate and n2n-eval."""
