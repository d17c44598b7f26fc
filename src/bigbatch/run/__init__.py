"""`train()`: wires a task (language modelling, classification) to the loop; checkpoints, resume, preemption, run_info.json."""
