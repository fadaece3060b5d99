"""The jobs the queue runs (:mod:`.entry`) and the feature shards that RQ workers share (:mod:`.shards`)."""
