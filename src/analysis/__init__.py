"""What a run means: the end-of-run verdict, the mean-field theory at init, the figures, the gradient check."""
