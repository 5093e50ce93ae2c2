"""Stage 1: run frozen experts once over datasets and cache their latents in stores."""
