"""One module per pipeline stage. Stages import `saectl`, never each other."""
