"""Reports for people: status of budgets, spend over time, and policy backtests."""
