"""memforge: build, train and ablate memory-augmented sequence models from plugins."""
