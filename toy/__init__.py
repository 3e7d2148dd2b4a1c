"""The 2D toy suite: data sets, the MLP teacher, evaluation against the teacher ODE, figures."""
