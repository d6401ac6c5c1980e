"""Walk-forward replay of the whole stack over historical candles (``make backtest``)."""
