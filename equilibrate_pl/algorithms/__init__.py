"""Pure torch math of the method: log-probs, DPO, AMA masks, rewards, PPO. No Lightning here."""
