"""The Lightning side: the strategy, the bundled module, callbacks, the launcher and checkpoint IO."""
