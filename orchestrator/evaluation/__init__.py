"""What evaluation and training share: generation and scoring (neither owns the other)."""
