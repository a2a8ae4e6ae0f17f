"""The learning signal: what makes two answers the same (clustering), how group-aware
shapers reward them (shapers), the advantages and the one policy loss with its switches
(loss), and the training forward's log-probs (forward)."""
