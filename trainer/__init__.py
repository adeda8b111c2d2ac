"""What every training stage shares: distributed setup, precision, optimizer and LR schedule, the training
loop (accumulation, clipping, logging), checkpoints and resume. Stage scripts pass everything as arguments."""
