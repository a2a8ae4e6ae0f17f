"""One training step, in the order DESIGN.md draws it, one part per module:

    collector     prompts -> rollouts -> scores -> shaped rewards
    learner       advantages -> loss -> optimizer step (micro-batches)
    step_metrics  what the step's rollouts say (every rank's, gathered)
    evaluator     what the policy answers now (sampled, and exact where answers are finite)

and around them: saver (checkpoints committed beside the next step), run_state (what a
checkpoint holds besides the weights), ending (final evaluation, checkpoint, export and
status, whatever stopped the run), outputs (plot, samples table, summary).

runner/train.py holds the run's lifecycle around them: set-up and resume, the loop, budget
and stop signals, checkpoints, tracking, the final artifacts.
"""
