"""The tail of nnUNetTrainer.train_step (2.8.1), shared by the trainers that replace its loss or forward."""
import torch
import torch.distributed as dist


def average_gradients(parameters) -> None:
    """Average the gradients of `parameters` over the DDP ranks, in one all-reduce: for a step that DDP does not
    see (the cached black-box head runs on the unwrapped network, so DDP's own hooks never fire). Call it on the
    still-scaled gradients, before unscaling and clipping, where DDP would reduce them."""
    params = [p for p in parameters if p.requires_grad]
    for p in params:  # every rank must send the same layout, even where one got no gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def backward_and_step(trainer, loss: torch.Tensor, sync=None) -> dict:
    """Backward (through the grad scaler on CUDA), clip gradients at 12, step: exactly as nnU-Net does.
    `sync`, when given, runs right after backward (see average_gradients)."""
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.scale(loss).backward()
        if sync is not None:
            sync()
        trainer.grad_scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        loss.backward()
        if sync is not None:
            sync()
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.optimizer.step()
    return {"loss": loss.detach().cpu().numpy()}
