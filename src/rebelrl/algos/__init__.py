"""One readable training loop per algorithm family."""
