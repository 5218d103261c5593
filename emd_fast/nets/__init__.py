"""Denoiser networks: the MLP for vector data, EDM's U-Nets (DDPM++, NCSN++, ADM), their preconditioning, and the
one-step generator built on any of them."""
