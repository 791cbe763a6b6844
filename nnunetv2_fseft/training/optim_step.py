"""The tail of nnUNetTrainer.train_step (2.8.1), shared by the trainers that replace its loss or forward."""
import torch


def backward_and_step(trainer, loss: torch.Tensor) -> dict:
    """Backward (through the grad scaler on CUDA), clip gradients at 12, step: exactly as nnU-Net does."""
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.scale(loss).backward()
        trainer.grad_scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.optimizer.step()
    return {"loss": loss.detach().cpu().numpy()}
