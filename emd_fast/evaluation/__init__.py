"""How a run is judged and shown: mixture and image metrics, FID, plots and image grids, the teacher's Heun sampler."""
