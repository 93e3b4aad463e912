"""shardwise trainer: runs a planned TP x PP x ZeRO layout with torch + DeepSpeed."""
