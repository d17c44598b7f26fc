"""Data parallel on torch.distributed: the process group from torchrun's environment, DDP/FSDP2 wrapping, and the `--nproc` launcher."""
