"""Plain torch ``nn.Module`` building blocks of the estimators (no sklearn imports)."""
