"""Exit codes shared by the training processes and the launcher (no imports: the pods' PID 1,
`xm_launch.runner`, reads this without loading JAX).

The launcher's JobSet failure policy (`xm_launch.gke.failure_policies`) restarts a slice on
`RESTART_EXIT_CODE` without spending its restart budget.
"""

# A process that was preempted (SIGTERM) after saving its state exits with this: restart me.
RESTART_EXIT_CODE = 42
