"""What the studies share: the machine and code state, the run cache, paired statistics, plotting, models, tasks,
the training harness of the accuracy studies, and work in fresh processes."""
