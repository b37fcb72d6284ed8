"""What the studies share: the machine and code state, the run cache, paired statistics, plotting, models, tasks
and the training harness of the accuracy studies."""
