"""Neural-net modules: caption decoder, domain discriminator + GRL, VQA head."""
