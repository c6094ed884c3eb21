//! The demo's shop: `Checkout.PlaceOrder` calls `Inventory` (unary,
//! server-streaming, client-streaming) and `Pricing` (bidi-streaming) through
//! checkout's own sidecar, and reports each hop with the caller identity the
//! callee's sidecar vouched for.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::caller_of;
use crate::pb::shop::v1::checkout_server::Checkout;
use crate::pb::shop::v1::inventory_client::InventoryClient;
use crate::pb::shop::v1::inventory_server::Inventory;
use crate::pb::shop::v1::pricing_client::PricingClient;
use crate::pb::shop::v1::pricing_server::Pricing;
use crate::pb::shop::v1::*;

pub struct InventoryService;

#[tonic::async_trait]
impl Inventory for InventoryService {
    async fn get_stock(&self, request: Request<StockRequest>) -> Result<Response<Stock>, Status> {
        let served_for = caller_of(&request);
        let sku = request.into_inner().sku;
        Ok(Response::new(Stock { available: stock_of(&sku), sku, served_for }))
    }

    type WatchStockStream = Pin<Box<dyn Stream<Item = Result<Stock, Status>> + Send>>;

    async fn watch_stock(&self, request: Request<StockRequest>) -> Result<Response<Self::WatchStockStream>, Status> {
        let served_for = caller_of(&request);
        let StockRequest { sku, updates } = request.into_inner();
        let start = stock_of(&sku);
        let updates = (0..updates).map(move |i| {
            Ok(Stock { sku: sku.clone(), available: start.saturating_sub(i), served_for: served_for.clone() })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(updates))))
    }

    async fn reserve(&self, request: Request<Streaming<ReserveItem>>) -> Result<Response<Reservation>, Status> {
        let served_for = caller_of(&request);
        let mut items = request.into_inner();
        let mut count = 0;
        while let Some(item) = items.next().await {
            count += item?.quantity;
        }
        Ok(Response::new(Reservation { reservation_id: format!("r-{count}"), items: count, served_for }))
    }
}

fn stock_of(sku: &str) -> u32 {
    sku.bytes().map(u32::from).sum::<u32>() % 40 + 3
}

pub struct PricingService;

#[tonic::async_trait]
impl Pricing for PricingService {
    type QuoteStream = Pin<Box<dyn Stream<Item = Result<QuoteReply, Status>> + Send>>;

    async fn quote(&self, request: Request<Streaming<QuoteRequest>>) -> Result<Response<Self::QuoteStream>, Status> {
        let served_for = caller_of(&request);
        let quotes = request.into_inner().map(move |quote| {
            let QuoteRequest { sku, quantity } = quote?;
            let cents = u64::from(stock_of(&sku)) * 97 * u64::from(quantity);
            Ok(QuoteReply { sku, cents, served_for: served_for.clone() })
        });
        Ok(Response::new(Box::pin(quotes)))
    }
}

/// A request carrying the caller's trace parent, if it came with one.
fn traced<T>(traceparent: &Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(traceparent) = traceparent {
        request.metadata_mut().insert("traceparent", traceparent.clone());
    }
    request
}

/// Calls the other services through this workload's outbound sidecar.
pub struct CheckoutService {
    pub inventory: InventoryClient<Channel>,
    pub pricing: PricingClient<Channel>,
}

#[tonic::async_trait]
impl Checkout for CheckoutService {
    async fn place_order(&self, request: Request<OrderRequest>) -> Result<Response<OrderReply>, Status> {
        let caller = caller_of(&request);
        // Its calls belong to the caller's trace, as an instrumented app's would.
        let traceparent = request.metadata().get("traceparent").cloned();
        let order = request.into_inner();
        let mut trail = vec![format!("shop.v1.Checkout/PlaceOrder (unary) served for {caller}")];
        let (mut inventory, mut pricing) = (self.inventory.clone(), self.pricing.clone());

        for sku in &order.skus {
            let stock = inventory
                .get_stock(traced(&traceparent, StockRequest { sku: sku.clone(), updates: 0 }))
                .await?
                .into_inner();
            trail.push(format!(
                "shop.v1.Inventory/GetStock (unary) {sku}: {} available, served for {}",
                stock.available, stock.served_for
            ));
        }

        let first = order.skus.first().cloned().unwrap_or_default();
        let mut watch = inventory
            .watch_stock(traced(&traceparent, StockRequest { sku: first.clone(), updates: 3 }))
            .await?
            .into_inner();
        let mut updates = Vec::new();
        let mut served_for = String::new();
        while let Some(stock) = watch.message().await? {
            updates.push(stock.available.to_string());
            served_for = stock.served_for;
        }
        trail.push(format!(
            "shop.v1.Inventory/WatchStock (server-streaming) {first}: updates [{}], served for {served_for}",
            updates.join(", ")
        ));

        let items: Vec<ReserveItem> =
            order.skus.iter().map(|sku| ReserveItem { sku: sku.clone(), quantity: 1 }).collect();
        let reservation = inventory.reserve(traced(&traceparent, tokio_stream::iter(items))).await?.into_inner();
        trail.push(format!(
            "shop.v1.Inventory/Reserve (client-streaming) {} items as {}, served for {}",
            reservation.items, reservation.reservation_id, reservation.served_for
        ));

        let quotes: Vec<QuoteRequest> =
            order.skus.iter().map(|sku| QuoteRequest { sku: sku.clone(), quantity: 1 }).collect();
        let mut replies = pricing.quote(traced(&traceparent, tokio_stream::iter(quotes))).await?.into_inner();
        let (mut total_cents, mut served_for, mut count) = (0, String::new(), 0);
        while let Some(quote) = replies.message().await? {
            total_cents += quote.cents;
            served_for = quote.served_for;
            count += 1;
        }
        trail.push(format!(
            "shop.v1.Pricing/Quote (bidi-streaming) {count} quotes, {total_cents} cents, served for {served_for}"
        ));
        Ok(Response::new(OrderReply { order_id: format!("order-{}", order.customer), total_cents, trail }))
    }
}

/// An order that starts a new trace, as an instrumented client would: the
/// request carries a sampled `traceparent`, and the trace ID is returned.
pub fn traced_order(customer: &str, skus: &[&str]) -> (Request<OrderRequest>, String) {
    let order = OrderRequest { customer: customer.into(), skus: skus.iter().map(|s| s.to_string()).collect() };
    let mut request = Request::new(order);
    let trace_id = format!("{:032x}", fastrand::u128(1..));
    let traceparent = format!("00-{trace_id}-{:016x}-01", fastrand::u64(1..));
    request.metadata_mut().insert("traceparent", traceparent.parse().expect("hex and dashes"));
    (request, trace_id)
}
